"""`python -m paraflow.bench [preset=NAME] [overrides] [+figure=PATH]` (see
paraflow/bench/__init__.py). `+figure=docs/figures/NAME.md` also writes bench.md's table there,
under this command line and the commit."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from paraflow.bench.grid import run_grid
from paraflow.bench.report import markdown, write, write_figure


@hydra.main(config_path="pkg://paraflow.conf.bench", config_name="bench", version_base="1.3")
def main(bench: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    command = shlex.join(["python", "-m", "paraflow.bench", *sys.argv[1:]])
    rows = run_grid(bench, out)
    write(rows, bench, out, command)
    if bench.get("figure"):
        write_figure(str(bench.figure), command, markdown(rows))
    print(markdown(rows), end="")
    print(f"written: {out}/bench.csv, bench.json, bench.md, *.png")


if __name__ == "__main__":
    main()
