"""Training the embedded default model: `python -m paraflow.tools.train` (see conf/train.yaml)."""
