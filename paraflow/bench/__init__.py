"""`python -m paraflow.bench [preset=NAME] [overrides]`: which layout is fastest on this machine,
at what cost. One command; the presets (conf/bench/preset: grid, patch, tensor, data,
throughput, policies, dit_flux, dit_pixart) are grids of layouts × sizes × rank counts × steps ×
links.

grid.py builds and runs the cells, report.py writes bench.json / bench.csv / bench.md, plots.py
the PNG plots. Every figure of one invocation is measured side by side (see grid.py)."""
