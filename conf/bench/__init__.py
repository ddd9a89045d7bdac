"""The benchmark command's configs: bench.yaml and its presets (preset/)."""
