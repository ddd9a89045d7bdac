"""PNG plots of a benchmark grid (paraflow.bench): one panel per image size; a layout on a
modeled link is its own line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402


def _panels(rows: list[dict[str, Any]]) -> tuple[Any, list[Any], list[int]]:
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), squeeze=False)
    return fig, list(axes[0]), sizes


def _series(rows: list[dict[str, Any]], size: int, key: str) -> dict[str, list[tuple]]:
    """strategy → [(ranks, value)], the one-rank baseline at the start of every line; the
    1-rank × N-thread runs as their own line, at x = N."""
    at = [r for r in rows if r["size"] == size and r.get(key) is not None]
    base = [r for r in at if r["strategy"] == "single" and r["ranks"] == 1]
    lowest = min((r["threads_per_rank"] for r in base), default=1)
    series: dict[str, list[tuple]] = {}
    for r in at:
        if r["strategy"] == "single":
            name = "1 rank × N threads"
            series.setdefault(name, []).append((r["threads_per_rank"] // lowest, r[key]))
        else:
            series.setdefault(_label(r), []).append((r["ranks"], r[key]))
    start = [(1, r[key]) for r in base if r["threads_per_rank"] == lowest]
    return {name: sorted(start + points if name != "1 rank × N threads" else points)
            for name, points in series.items()}


def _label(row: dict[str, Any]) -> str:
    return row["strategy"] + ("" if row.get("link", "real") == "real" else f" @{row['link']}")


def _line_plot(rows: list[dict[str, Any]], key: str, ylabel: str, path: Path,
               ideal: bool = False) -> None:
    fig, axes, sizes = _panels(rows)
    for ax, size in zip(axes, sizes):
        for name, points in _series(rows, size, key).items():
            style = "--" if name.startswith("1 rank") else "-"
            ax.plot(*zip(*points), style, marker="o", label=name)
        if ideal:
            top = max(r["ranks"] for r in rows)
            ax.plot([1, top], [1, top], ":", color="grey", label="linear")
        ax.set(title=f"{size}²", xlabel="ranks (or threads)", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_plot(rows: list[dict[str, Any]], key: str, ylabel: str, path: Path,
              cap: float | None = None) -> None:
    fig, axes, sizes = _panels(rows)
    for ax, size in zip(axes, sizes):
        at = [r for r in rows if r["size"] == size and r["strategy"] != "single"]
        top = max((r["ranks"] for r in at), default=1)
        chosen = [r for r in at if r["ranks"] == top and r.get(key) is not None]
        values = [r[key] for r in chosen]
        if cap is not None:
            values = [cap if math.isinf(v) else v for v in values]
        ax.bar([_label(r) for r in chosen], values)
        ax.set(title=f"{size}², {top} ranks", ylabel=ylabel)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_quality_plot(rows: list[dict[str, Any]], path: Path, cap: float = 100) -> None:
    """Speedup against PSNR, one point per cell: what a step cache or a displaced exchange
    trades (preset=accelerate)."""
    fig, axes, sizes = _panels(rows)
    for ax, size in zip(axes, sizes):
        for r in rows:
            if r["size"] != size or r.get("speedup") is None or r.get("psnr_db") is None:
                continue
            quality = cap if math.isinf(r["psnr_db"]) else r["psnr_db"]
            ax.scatter(quality, r["speedup"], s=14)
            ax.annotate(f"{_label(r)} ×{r['ranks']}", (quality, r["speedup"]), fontsize=6)
        ax.set(title=f"{size}²", xlabel=f"PSNR vs one device, dB (exact shown as {cap:g})",
               ylabel="speedup over one device")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    paths = [out / name for name in ("latency.png", "speedup.png", "bytes_per_image.png",
                                     "psnr.png", "speed_quality.png")]
    _line_plot(rows, "latency_s", "latency of the run (s)", paths[0])
    _line_plot(rows, "speedup", "speedup over 1 rank × 1 thread", paths[1], ideal=True)
    _bar_plot(rows, "bytes_per_image_per_rank", "bytes per image per rank", paths[2])
    _bar_plot(rows, "psnr_db", "PSNR vs one device (dB; exact shown as 100)", paths[3], cap=100)
    _speed_quality_plot(rows, paths[4])
    return paths
