"""Tools around the runtime, each `python -m paraflow.tools.NAME`: parity reports, the planner
against measurement, the default model's training, samples and caption checker, and its world."""
