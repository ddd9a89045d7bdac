"""The cells of a benchmark and how they are run.

A cell is one layout (a strategy name, or a named variant: overrides such as a GroupNorm mode or
a stage policy), at one rank count, size, step count and link. Every cell: the median latency of
`repeats` runs (one discarded run first in each launch), the speedup over 1 rank ×
`threads_per_rank` threads at the same size and steps (real transport) measured in this
invocation, images/s, bytes per step and per image (rank 0), parameter and peak memory per rank,
the working memory per rank from a separate untimed pass, PSNR of the first image and of the
final latents against the one-device run, and whether every image is identical to it. Cells a
layout cannot run are listed as skipped, with the reason.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import load_file

from paraflow import metrics
from paraflow.errors import ParaflowError

MB = 1e6  # decimal, as everywhere in paraflow (plan_memory_gb, link GB/s)


def hydra_quoted(text: str) -> str:
    """`text` as one quoted Hydra override value."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Cell:
    strategy: str  # "single" for one rank, else the layout's name
    ranks: int
    threads_per_rank: int
    size: int
    steps: int
    link: str = "real"  # or "B GB/s L us" (a modeled link, launcher.link)
    extra: tuple[str, ...] = ()  # the layout's overrides (+strategy=..., options, policies)

    @property
    def name(self) -> str:
        at = "" if self.link == "real" else f" @{self.link.replace(' ', '')}"
        return (f"{self.strategy} {self.ranks}x{self.threads_per_rank} {self.size}px "
                f"{self.steps}st{at}")

    def overrides(self, bench: DictConfig) -> list[str]:
        prompts = ",".join(hydra_quoted(str(p)) for p in bench.prompts)  # commas stay inside
        run = [f"model={bench.model}", f"height={self.size}", f"width={self.size}",
               f"steps={self.steps}", f"prompt=[{prompts}]",
               f"images_per_prompt={bench.images_per_prompt}", "pipeline.progress=false",
               "save_latents=true", f"launcher.devices={self.ranks}",
               f"launcher.threads_per_rank={self.threads_per_rank}", *bench.extra]
        if self.link != "real":
            bandwidth, latency = self.link.split(" GB/s ")
            run += [f"launcher.link.bandwidth_gb_s={bandwidth}",
                    f"launcher.link.latency_us={latency.removesuffix(' us')}"]
        return [*run, *self.extra]


def layouts(bench: DictConfig) -> list[tuple[str, tuple[str, ...], list[int] | None]]:
    """(name, overrides, rank counts or None for all above 1) of every entry of
    bench.strategies: a strategy name, or {name, overrides, ranks (optional)}."""
    out: list[tuple[str, tuple[str, ...], list[int] | None]] = []
    for entry in bench.strategies:
        if isinstance(entry, str):
            out.append((entry, (f"+strategy={entry}",), None))
        else:
            ranks = [int(n) for n in entry.ranks] if entry.get("ranks") is not None else None
            out.append((str(entry.name), tuple(str(o) for o in entry.overrides), ranks))
    return out


def link_labels(bench: DictConfig) -> list[str]:
    return ["real" if link is None else f"{link.bandwidth_gb_s} GB/s {link.latency_us} us"
            for link in bench.links]


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
            entries = layouts(bench)
            counts = sorted({n for *_, only in entries for n in (only or ranks)})
            for link in link_labels(bench):
                for n in counts:  # rank counts outermost: a launch per count anyway
                    cells += [Cell(name, n, threads, size, steps, link, extra)
                              for name, extra, only in entries
                              if n in (only or [m for m in ranks if m > 1])]
    return cells


def _images(record: dict[str, Any]) -> list[np.ndarray]:
    folder = Path(record["output_dir"])
    return [np.asarray(Image.open(folder / name)) for name in record["images"]]


def _latents(record: dict[str, Any]) -> torch.Tensor:
    return load_file(str(Path(record["output_dir"]) / "latents.safetensors"))["latents"]


def summarize(cell: Cell, timed: list[dict[str, Any]], memory: dict[str, Any] | None,
              baseline: list[dict[str, Any]] | None) -> dict[str, Any]:
    first = timed[0]
    latency = statistics.median(r["latency_s"] for r in timed)
    images = int(first["n_images"])
    steps = list(first["comm_bytes_per_step"][0].values())
    params = first["param_bytes"]
    denoiser_bytes = params["unet"] if "unet" in params else params["transformer"]
    row: dict[str, Any] = {**asdict(cell), "extra": list(cell.extra), "status": "ok",
                           "images": images, "latency_s": latency,
                           "latencies_s": [r["latency_s"] for r in timed],
                           "images_per_s": images / latency, "speedup": None,
                           "denoiser_calls": first.get("denoiser_calls"),
                           "bytes_per_step_per_rank": statistics.median(steps) if steps else 0,
                           "bytes_per_image_per_rank": first["comm_bytes"][0] / images,
                           "denoiser_mb_per_rank": [b / MB for b in denoiser_bytes],
                           "peak_mb_per_rank": [b / MB for b in first["peak_memory_bytes"]],
                           "working_mb_per_rank": None, "psnr_db": None,
                           "psnr_latents_db": None, "identical_to_single": None,
                           "max_pixel_diff": None}
    if memory is not None and None not in memory["working_memory_bytes"]:
        row["working_mb_per_rank"] = [b / MB for b in memory["working_memory_bytes"]]
    if baseline:
        row["speedup"] = statistics.median(r["latency_s"] for r in baseline) / latency
        reference = _images(baseline[0])
        row["psnr_db"] = metrics.psnr(_images(first)[0], reference[0], 255.0)
        ref_latents = _latents(baseline[0])
        row["psnr_latents_db"] = metrics.psnr(_latents(first), ref_latents,
                                              float(ref_latents.max() - ref_latents.min()))
        runs = [_images(r) for r in timed]
        row["max_pixel_diff"] = max(int(np.abs(a.astype(int) - b.astype(int)).max())
                                    for got in runs for a, b in zip(got, reference))
        row["identical_to_single"] = row["max_pixel_diff"] == 0 and all(
            len(got) == len(reference) for got in runs)
    return row


def run_grid(bench: DictConfig, out: Path) -> list[dict[str, Any]]:
    from paraflow.api import compose
    from paraflow.compile import any_stage_compiles
    from paraflow.many import launch_many, prepared

    rows: dict[Cell, dict[str, Any]] = {}
    runnable: list[Cell] = []
    for cell in grid(bench):
        try:
            prepared(compose(cell.overrides(bench)), out / "check")  # errors before any launch
            runnable.append(cell)
        except ParaflowError as err:
            rows[cell] = {**asdict(cell), "extra": list(cell.extra), "status": f"skipped: {err}"}

    def slug(cell: Cell) -> str:
        return "".join(c if c.isalnum() or c in "-." else "_" for c in cell.name)

    repeats = int(bench.repeats)
    # Cells alternate run by run (drift spreads over all alike); a compiling cell runs its
    # repeats back to back after an untimed one, since a session of another configuration
    # recompiles (paraflow/compile.py: fresh_compilation) and its graphs are what is measured.
    compiling = {c for c in runnable
                 if any_stage_compiles(compose(c.overrides(bench)).pipeline.stages)}
    runs = [(cell, f"r{r}") for r in range(repeats) for cell in runnable
            if cell not in compiling]
    runs += [(cell, name) for cell in runnable if cell in compiling
             for name in ("compile", *(f"r{r}" for r in range(repeats)))]
    cfgs = [prepared(compose(cell.overrides(bench)), out / "runs" / slug(cell) / name)
            for cell, name in runs]
    records = launch_many(cfgs, discard_first=True)
    timed: dict[Cell, list[dict[str, Any]]] = {cell: [] for cell in runnable}
    for (cell, name), record in zip(runs, records):
        if name != "compile":
            timed[cell].append(record)
    memory: dict[Cell, dict[str, Any]] = {}
    if bench.memory_pass:
        passes = [prepared(compose(c.overrides(bench)), out / "runs" / slug(c) / "memory")
                  for c in runnable]
        memory = dict(zip(runnable, launch_many(passes, discard_first=True, track_memory=True)))
    for cell in runnable:
        base = Cell("single", 1, int(bench.threads_per_rank), cell.size, cell.steps)
        rows[cell] = summarize(cell, timed[cell], memory.get(cell), timed.get(base))
        rows[cell]["cost_per_image"] = cost_per_image(rows[cell], bench)
    return [rows[c] for c in grid(bench)]


def cost_per_image(row: dict[str, Any], bench: DictConfig) -> float | None:
    """The price of one image at cost.device_hour per device (a rank is a device): every
    device of the cell is paid for the whole latency."""
    price = (bench.get("cost") or {}).get("device_hour")
    if price is None:
        return None
    return float(price) * int(row["ranks"]) * float(row["latency_s"]) / 3600 / int(row["images"])
