"""The benchmark's files: bench.json (setup, command, every cell), bench.csv, bench.md, plots.
Sizes are decimal: 1 MB = 10⁶ bytes."""

from __future__ import annotations

import csv
import json
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
    (out / "bench.md").write_text(f"`{command}`\n\n" + markdown(rows))
    plot_all([r for r in rows if r["status"] == "ok"], out)
