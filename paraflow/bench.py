"""`python -m paraflow.bench [overrides]`: which layout is fastest on this machine, at what cost.

Runs the grid of conf/bench.yaml (strategies × sizes × rank counts × steps; Hydra overrides
choose it, `--config-name bench_throughput` is the serving-guide preset) and writes into its run
directory: bench.csv and bench.json (every cell), bench.md (the table) and PNG plots (latency
and speedup against ranks, bytes per image, PSNR against one device).

Every cell: the median latency of `repeats` runs (one discarded run first in each launch), the
speedup over 1 rank × `threads_per_rank` threads at the same size and steps measured in this
invocation, images/s, bytes per step and per image (rank 0), process peak memory per rank, the
working memory per rank from a separate untimed pass, PSNR of the first image against the
one-device image and whether every image is identical to it. Cells a layout cannot run (a rank
count the model does not split into) are listed as skipped, with the reason.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import csv
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from paraflow import metrics
from paraflow.errors import ParaflowError

MB = 2**20


def hydra_quoted(text: str) -> str:
    """`text` as one quoted Hydra override value."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Cell:
    strategy: str  # "single" for one rank
    ranks: int
    threads_per_rank: int
    size: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.strategy} {self.ranks}x{self.threads_per_rank} {self.size}px {self.steps}st"

    def overrides(self, bench: DictConfig) -> list[str]:
        prompts = ",".join(hydra_quoted(str(p)) for p in bench.prompts)  # commas stay inside
        run = [f"model={bench.model}", f"height={self.size}", f"width={self.size}",
               f"steps={self.steps}", f"prompt=[{prompts}]",
               f"images_per_prompt={bench.images_per_prompt}", "pipeline.progress=false",
               "save_latents=true", f"launcher.devices={self.ranks}",
               f"launcher.threads_per_rank={self.threads_per_rank}", *bench.extra]
        return run if self.strategy == "single" else [*run, f"+strategy={self.strategy}"]


def grid(bench: DictConfig) -> list[Cell]:
    """Baselines first (1 rank × threads_per_rank, then 1 rank × N threads), then layouts."""
    threads = int(bench.threads_per_rank)
    ranks = sorted({int(n) for n in bench.ranks})
    cells = []
    for size in (int(round(s * float(bench.scale))) for s in bench.sizes):
        for steps in (int(s) for s in bench.steps):
            cells.append(Cell("single", 1, threads, size, steps))
            if bench.thread_baselines:
                cells += [Cell("single", 1, n * threads, size, steps) for n in ranks if n > 1]
            cells += [Cell(str(s), n, threads, size, steps)
                      for n in ranks if n > 1 for s in bench.strategies]
    return cells


def _images(record: dict[str, Any]) -> list[np.ndarray]:
    folder = Path(record["output_dir"])
    return [np.asarray(Image.open(folder / name)) for name in record["images"]]


def summarize(cell: Cell, timed: list[dict[str, Any]], memory: dict[str, Any] | None,
              baseline: list[dict[str, Any]] | None) -> dict[str, Any]:
    first = timed[0]
    latency = statistics.median(r["latency_s"] for r in timed)
    images = int(first["n_images"])
    steps = list(first["comm_bytes_per_step"][0].values())
    row: dict[str, Any] = {**asdict(cell), "status": "ok", "images": images,
                           "latency_s": latency, "latencies_s": [r["latency_s"] for r in timed],
                           "images_per_s": images / latency, "speedup": None,
                           "bytes_per_step_per_rank": statistics.median(steps) if steps else 0,
                           "bytes_per_image_per_rank": first["comm_bytes"][0] / images,
                           "peak_memory_mb_per_rank": [b / MB for b in first["peak_memory_bytes"]],
                           "working_memory_mb_per_rank": None, "psnr_db": None,
                           "identical_to_single": None, "max_pixel_diff": None,
                           "link": first["link"]}
    if memory is not None and None not in memory["working_memory_bytes"]:
        row["working_memory_mb_per_rank"] = [b / MB for b in memory["working_memory_bytes"]]
    if baseline:
        row["speedup"] = statistics.median(r["latency_s"] for r in baseline) / latency
        reference = _images(baseline[0])
        row["psnr_db"] = metrics.psnr(_images(first)[0], reference[0], 255.0)
        runs = [_images(r) for r in timed]
        row["max_pixel_diff"] = max(int(np.abs(a.astype(int) - b.astype(int)).max())
                                    for got in runs for a, b in zip(got, reference))
        row["identical_to_single"] = row["max_pixel_diff"] == 0 and all(
            len(got) == len(reference) for got in runs)
    return row


def run_grid(bench: DictConfig, out: Path) -> list[dict[str, Any]]:
    from paraflow.api import compose
    from paraflow.many import launch_many, prepared

    rows: dict[Cell, dict[str, Any]] = {}
    runnable: list[Cell] = []
    for cell in grid(bench):
        try:
            prepared(compose(cell.overrides(bench)), out / "check")  # errors before any launch
            runnable.append(cell)
        except ParaflowError as err:
            rows[cell] = {**asdict(cell), "status": f"skipped: {err}"}

    def slug(cell: Cell) -> str:
        return cell.name.replace(" ", "_")

    repeats = int(bench.repeats)
    cfgs = [prepared(compose(cell.overrides(bench)), out / "runs" / slug(cell) / f"r{r}")
            for r in range(repeats) for cell in runnable]
    records = launch_many(cfgs, discard_first=True)
    memory: dict[Cell, dict[str, Any]] = {}
    if bench.memory_pass:
        passes = [prepared(compose(c.overrides(bench)), out / "runs" / slug(c) / "memory")
                  for c in runnable]
        memory = dict(zip(runnable, launch_many(passes, discard_first=True, track_memory=True)))
    timed = {cell: records[i::len(runnable)] for i, cell in enumerate(runnable)}
    for cell in runnable:
        base = Cell("single", 1, int(bench.threads_per_rank), cell.size, cell.steps)
        rows[cell] = summarize(cell, timed[cell], memory.get(cell), timed.get(base))
    return [rows[c] for c in grid(bench)]


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return " / ".join(_fmt(v, ".0f") for v in value)
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| strategy | ranks × threads | size | steps | latency s | speedup | images/s | "
            "bytes/step/rank | bytes/image/rank | peak MB/rank | working MB/rank | PSNR dB | "
            "identical (max Δ grey) |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        layout = f"{r['ranks']}×{r['threads_per_rank']}"
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | {layout} | {r['size']} | {r['steps']} | "
                         f"{r['status']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['strategy']} | {layout} | {r['size']} | {r['steps']} | {r['latency_s']:.2f} | "
            f"{_fmt(r['speedup'])}× | {r['images_per_s']:.2f} | "
            f"{r['bytes_per_step_per_rank']:,.0f} | {r['bytes_per_image_per_rank']:,.0f} | "
            f"{_fmt(r['peak_memory_mb_per_rank'])} | {_fmt(r['working_memory_mb_per_rank'])} | "
            f"{_fmt(r['psnr_db'], '.1f')} | {_fmt(r['identical_to_single'])} "
            f"({_fmt(r['max_pixel_diff'])}) |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], bench: DictConfig, out: Path) -> None:
    from paraflow.bench_plots import plot_all

    setup = OmegaConf.to_container(bench, resolve=True)
    (out / "bench.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2,
                                               default=str))
    fields = sorted({k for r in rows for k in r})
    with open(out / "bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(v, "") if isinstance(v, list) else v for k, v in r.items()})
    (out / "bench.md").write_text(markdown(rows))
    plot_all([r for r in rows if r["status"] == "ok"], out)


@hydra.main(config_path="pkg://paraflow.conf", config_name="bench", version_base="1.3")
def main(bench: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    rows = run_grid(bench, out)
    write(rows, bench, out)
    print(markdown(rows), end="")
    print(f"written: {out}/bench.csv, bench.json, bench.md, *.png")


if __name__ == "__main__":
    main()
