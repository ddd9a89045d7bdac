"""The benchmark's files: bench.json (setup, command, every cell), bench.csv, bench.md, plots.
Sizes are decimal: 1 MB = 10⁶ bytes.

`figure` / `write_figure`: a table for docs/ (the bench's, the planner's, the parity tool's) under
the command line that wrote it and the commit it ran at, so every figure in the docs can be
regenerated and none is typed by hand."""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return " / ".join(_fmt(v, ".1f") for v in value)
    return format(value, spec) if isinstance(value, float) else str(value)


COLUMNS = ("strategy | ranks × threads | size | steps | link | latency s | speedup | images/s | "
           "cost/image | denoiser calls/rank | "
           "bytes/step/rank | bytes/image/rank | denoiser MB/rank | peak MB/rank | "
           "working MB/rank | "
           "PSNR image dB | PSNR latents dB | identical (max Δ grey)")


def markdown(rows: list[dict[str, Any]]) -> str:
    width = COLUMNS.count("|") + 1
    lines = [f"| {COLUMNS} |", "|" + "---|" * width]
    for r in rows:
        head = (f"| {r['strategy']} | {r['ranks']}×{r['threads_per_rank']} | {r['size']} | "
                f"{r['steps']} | {r['link']} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} |" + " |" * (width - 6))
            continue
        lines.append(
            f"{head} {r['latency_s']:.2f} | {_fmt(r['speedup'])}× | {r['images_per_s']:.2f} | "
            f"{_fmt(r.get('cost_per_image'), '.3g')} | {_fmt(r.get('denoiser_calls'))} | "
            f"{r['bytes_per_step_per_rank']:,.0f} | {r['bytes_per_image_per_rank']:,.0f} | "
            f"{_fmt(r['denoiser_mb_per_rank'])} | {_fmt(r['peak_mb_per_rank'])} | "
            f"{_fmt(r['working_mb_per_rank'])} | {_fmt(r['psnr_db'], '.1f')} | "
            f"{_fmt(r['psnr_latents_db'], '.1f')} | {_fmt(r['identical_to_single'])} "
            f"({_fmt(r['max_pixel_diff'])}) |")
    return "\n".join(lines) + "\n"


def write(rows: list[dict[str, Any]], bench: DictConfig, out: Path, command: str) -> None:
    from paraflow.bench.plots import plot_all

    setup = OmegaConf.to_container(bench, resolve=True)
    (out / "bench.json").write_text(json.dumps({"command": command, "setup": setup,
                                                "rows": rows}, indent=2, default=str))
    fields = sorted({k for r in rows for k in r})
    with open(out / "bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(v, "") if isinstance(v, list) else v for k, v in r.items()})
    (out / "bench.md").write_text(figure(command, markdown(rows)))
    plot_all([r for r in rows if r["status"] == "ok"], out)


def _git(*args: str) -> str | None:
    """`git ARGS` in the source tree of this package (None: not a git checkout, or no git)."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit() -> str:
    """`git rev-parse --short HEAD` of the code that ran, marked when the tree holds changes not
    committed yet; "unknown" for an installed copy outside a checkout."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown"
    return f"{head} (with uncommitted changes)" if _git("status", "--porcelain") else head


def machine() -> str:
    """The machine, and its 1-minute load average when the figure is written (other work on
    the same cores makes timings slower)."""
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s){load}"


def figure(command: str, table: str, measured: bool = True) -> str:
    """`table` (markdown) under the command that wrote it, the commit and, for measured figures
    (timings, memory), the machine."""
    head, _, dirty = commit().partition(" ")
    at = f"`{head}` {dirty}".rstrip()
    where = f", on {machine()}" if measured else ""
    return (f"<!-- written by the command below; regenerate it, do not edit by hand -->\n"
            f"`{command}`\n\nat commit {at}{where}\n\n{table.rstrip()}\n")


def write_figure(path: Path | str, command: str, table: str, measured: bool = True) -> None:
    """`figure(...)` written to `path` (e.g. docs/figures/NAME.md), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(figure(command, table, measured))
    tmp.replace(path)
