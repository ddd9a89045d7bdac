"""Training the embedded default model: `python -m paraflow.train` (see conf/train.yaml)."""
