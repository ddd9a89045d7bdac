"""Parity report: how far a strategy's image is from the single-device image with the same seed.

    python -m paraflow.tools.parity +strategy=distrifusion launcher.devices=2 height=128 width=128
    python -m paraflow.tools.parity +strategy=displaced_patch launcher.devices=2 \\
        --vary strategy.groupnorm=corrected_async,stale,separate --vary strategy.warmup_steps=1,4

For each candidate: max |Δ| of the final latents, PSNR and SSIM of the image, the seam score at
the band boundaries (paraflow.metrics.seam_score; the single-device image's score at the same
rows beside it), and the per-step drift of the latents against `sync_patch` on the same ranks
(exact, so drift is what displaced activations cost, step by step). Writes parity.json,
parity.md, drift.png and, per candidate, the reference, the candidate and their difference side
by side (compare/NAME.png) into --out; `--figure docs/figures/NAME.md` also writes parity.md's
table there, under the command line and the commit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import load_file

from paraflow import metrics
from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.many import launch_many, prepared
from paraflow.plugin import parity_reference
from paraflow.pool import RankPools
from paraflow.registry import build_strategy

TRACE = ["save_trajectory=true", "pipeline.progress=false"]


def _is_strategy_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "strategy" or key.startswith("strategy.")


def reference_overrides(overrides: Sequence[str]) -> list[str]:
    """The same run on one device: strategy and rank count dropped."""
    return [o for o in overrides if not _is_strategy_override(o)
            and not o.startswith(("launcher.devices=", "launcher.num_nodes="))]


def sync_overrides(overrides: Sequence[str], cfg: DictConfig) -> list[str] | None:
    """The same layout under the strategy's exact twin (sync_patch for the patch strategies;
    None when it has none)."""
    twin = parity_reference(build_strategy(cfg.strategy)).exact_twin(cfg)
    if twin is None:
        return None
    if twin[0] == f"+strategy={cfg.strategy.name}":
        return list(overrides)
    return [*[o for o in overrides if not _is_strategy_override(o)], *twin]


def band_boundaries(cfg: DictConfig, rows: int) -> list[int]:
    """First pixel row of every band but the first, for an image of `rows` pixel rows."""
    from paraflow.validate import model_factor

    bands = parity_reference(build_strategy(cfg.strategy)).band_rows(cfg)
    if bands is None:
        return []
    factor = model_factor(cfg.model)
    starts = np.cumsum(bands)[:-1] * factor
    return [int(s) for s in starts]


def _outputs(record: dict[str, Any]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    folder = Path(record["output_dir"])
    image = np.asarray(Image.open(folder / record["images"][0]).convert("RGB"))
    return image, load_file(str(folder / "latents.safetensors"))


def _side_by_side(reference: np.ndarray, candidate: np.ndarray, path: Path) -> None:
    """reference | candidate | |difference| × 4 (grey), one PNG."""
    difference = np.abs(candidate.astype(int) - reference.astype(int)).max(-1) * 4
    grey = np.repeat(np.clip(difference, 0, 255).astype(np.uint8)[..., None], 3, -1)
    gap = np.full((reference.shape[0], 4, 3), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([reference, gap, candidate, gap, grey], axis=1)).save(path)


def compare(candidates: dict[str, list[str]], out: Path,
            pools: RankPools | None = None) -> list[dict[str, Any]]:
    """Run every candidate, its one-device reference and its sync_patch twin (each distinct
    run once; runs of one rank count share a launch, or run on `pools`' kept ranks) and
    compare. Returns the table rows."""
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, ...], DictConfig] = {}

    def run_key(overrides: list[str]) -> tuple[str, ...]:
        key = tuple([*overrides, *TRACE])
        if key not in runs:
            runs[key] = prepared(compose(list(key)), out / "runs" / f"{len(runs):02d}")
        return key

    plan = []
    for name, overrides in candidates.items():
        mine = run_key(list(overrides))
        twin_overrides = sync_overrides(overrides, runs[mine])
        twin = run_key(twin_overrides) if twin_overrides is not None else None
        plan.append((name, mine, run_key(reference_overrides(overrides)), twin))
    records = dict(zip(runs, launch_many(list(runs.values()), pools=pools)))

    rows = []
    for name, mine, ref, twin in plan:
        image, tensors = _outputs(records[mine])
        ref_image, ref_tensors = _outputs(records[ref])
        boundaries = band_boundaries(runs[mine], image.shape[0])
        row = {
            "name": name, "strategy": records[mine]["strategy_mode"],
            "ranks": records[mine]["world_size"],
            "max_abs_latents": float((tensors["latents"] - ref_tensors["latents"]).abs().max()),
            "psnr_db": metrics.psnr(image, ref_image, 255.0),
            "ssim": metrics.ssim(image, ref_image),
            "seam_score": metrics.seam_score(image, boundaries),
            "seam_score_reference": metrics.seam_score(ref_image, boundaries),
            "latency_s": records[mine]["latency_s"],
            "drift": None,
        }
        if twin is not None:
            row["drift"] = metrics.drift(tensors["trajectory"],
                                         _outputs(records[twin])[1]["trajectory"])
        (out / "compare").mkdir(exist_ok=True)
        _side_by_side(ref_image, image, out / "compare" / f"{name}.png")
        rows.append(row)
    _write(rows, candidates, out)
    return rows


def _write(rows: list[dict[str, Any]], candidates: dict[str, list[str]], out: Path) -> None:
    (out / "parity.json").write_text(json.dumps({"candidates": candidates, "rows": rows},
                                                indent=2, default=str))
    lines = ["| candidate | strategy | ranks | max abs Δ latents | PSNR dB | SSIM | seam score "
             "(single) | final drift vs sync_patch |", "|" + "---|" * 8]
    for r in rows:
        final = f"{r['drift'][-1]:.2e}" if r["drift"] else "–"
        seam = ("–" if math.isnan(r["seam_score"])  # not a patch layout: no band boundaries
                else f"{r['seam_score']:.2f} ({r['seam_score_reference']:.2f})")
        lines.append(f"| {r['name']} | {r['strategy']} | {r['ranks']} | "
                     f"{r['max_abs_latents']:.2e} | {r['psnr_db']:.1f} | {r['ssim']:.4f} | "
                     f"{seam} | {final} |")
    (out / "parity.md").write_text("\n".join(lines) + "\n")
    plot_drift(rows, out / "drift.png")


def plot_drift(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        if r["drift"]:
            ax.plot(range(len(r["drift"])), np.maximum(r["drift"], 1e-9), label=r["name"])
    ax.set(yscale="log", xlabel="denoising step",
           ylabel="RMS(latents − sync_patch) / RMS(sync_patch)", title="drift against sync_patch")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def candidates_from(overrides: list[str], vary: list[str]) -> dict[str, list[str]]:
    """One candidate per combination of the --vary values (KEY=V1,V2,...), named by them."""
    axes = []
    for item in vary:
        key, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--vary {item}: expected KEY=VALUE1,VALUE2,...")
        axes.append([(key, v) for v in values.split(",")])
    result = {}
    for combo in itertools.product(*axes):
        name = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in combo) or "candidate"
        result[name] = [*overrides, *(f"{k}={v}" for k, v in combo)]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="paraflow overrides of the candidate run")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--out", type=Path, default=Path("parity"))
    parser.add_argument("--figure", type=Path, help="also write the table here, with the "
                        "command and the commit (e.g. docs/figures/NAME.md)")
    args = parser.parse_args(argv)
    try:
        rows = compare(candidates_from(args.overrides, args.vary), args.out)
    except (ParaflowError, ConfigCompositionException) as err:
        raise SystemExit(f"paraflow.tools.parity: error: {err}") from None
    if args.figure is not None:
        import shlex
        import sys

        from paraflow.bench.report import write_figure

        given = sys.argv[1:] if argv is None else argv
        write_figure(args.figure, shlex.join(["python", "-m", "paraflow.tools.parity", *given]),
                     (args.out / "parity.md").read_text())
    print((args.out / "parity.md").read_text(), end="")
    print(f"written: {args.out}/parity.json, parity.md, drift.png, compare/ ({len(rows)} rows)")


if __name__ == "__main__":
    main()
