"""Patch-parallel benchmark: 2 ranks × 1 thread against 1 rank × 1 thread (and 1 × 2 threads),
side by side, on the real transport and on a modeled link; medians over repeats.

    python -m paraflow.bench_patch --size 256 --steps 20 --repeats 3 --out bench/patch

Writes bench_patch.json and bench_patch.md in --out: latency, speedup over 1×1, PSNR of the image
(and of the final latents) against 1×1, bytes per step and per image, the process peak per rank,
and the working memory per rank from a separate pass (paraflow.memory.track_live_tensors; it slows
allocation, so it is not timed).
Every run of one world size and link shares one launch (runs interleaved, so drift hits all).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from paraflow.api import compose
from paraflow.many import launch_many, prepared
from paraflow.metrics import psnr


def patch_runs(warmup: int) -> dict[str, list[str]]:
    displaced = ["+strategy=displaced_patch", f"strategy.warmup_steps={warmup}"]
    return {
        "naive_patch": ["+strategy=naive_patch"],
        "sync_patch": ["+strategy=sync_patch"],
        **{f"displaced_patch[{m}]": [*displaced, f"strategy.groupnorm={m}"]
           for m in ("corrected_async", "stale", "sync", "separate")},
        "frozen (no-comm ideal)": [*displaced, "strategy.frozen=true"],
    }

PCIE = ["launcher.link.bandwidth_gb_s=16", "launcher.link.latency_us=10"]


def _launch(overrides_list: list[list[str]], out: Path, tag: str,
            memory_pass: bool = False) -> list[dict[str, Any]]:
    """Every run (one launch per rank count), after one discarded run."""
    cfgs = [prepared(compose(o), out / f"{tag}_{i}") for i, o in enumerate(overrides_list)]
    return launch_many(cfgs, discard_first=True, track_memory=memory_pass)


def _image(record: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(Path(record["output_dir"]) / record["images"][0])).astype(float)


def _latents(record: dict[str, Any]) -> torch.Tensor:
    return load_file(str(Path(record["output_dir"]) / "latents.safetensors"))["latents"]


def memory_pass(base: list[str], out: Path, warmup: int) -> dict[tuple[str, str], list[float]]:
    """Working memory per rank (MB) of single, naive, sync, displaced and frozen, one run each
    after a discarded one, with the resident set following live tensors. Last: a 1-rank launch
    runs in this process, which keeps the allocator setting."""
    groups = {k: v for k, v in patch_runs(warmup).items()
              if "[" not in k or "corrected_async" in k}
    two = ["launcher.devices=2", "launcher.threads_per_rank=1"]
    records = _launch([[*base, *v, *two] for v in groups.values()], out, "memory_2x1", True)
    single = _launch([[*base, "launcher.devices=1", "launcher.threads_per_rank=1"]], out,
                     "memory_1x1", True)
    working = {("single (1 rank x 1 thread)", "1x1"): single[0]["working_memory_bytes"]}
    working.update({(name, "2x1"): rec["working_memory_bytes"]
                    for name, rec in zip(groups, records)})
    return {key: [b / 2**20 for b in value] for key, value in working.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny_random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/patch"))
    args = parser.parse_args(argv)
    base = [f"model={args.model}", f"height={args.size}", f"width={args.size}",
            f"steps={args.steps}", "save_latents=true", "pipeline.progress=false"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def measure(label: str, link: str, groups: dict[str, list[str]], launcher: list[str]) -> None:
        names = list(groups)
        overrides = [[*base, *groups[n], *launcher] for _ in range(args.repeats) for n in names]
        records = _launch(overrides, args.out / "runs", f"{label}_{len(rows)}")
        for i, name in enumerate(names):
            mine = records[i::len(names)]
            rows.append({"run": name, "layout": label, "link": link, "records": mine})

    measure("1x1", "-", {"single (1 rank x 1 thread)": []},
            ["launcher.devices=1", "launcher.threads_per_rank=1"])
    measure("1x2", "-", {"single (1 rank x 2 threads)": []},
            ["launcher.devices=1", "launcher.threads_per_rank=2"])
    two = ["launcher.devices=2", "launcher.threads_per_rank=1"]
    measure("2x1", "real", patch_runs(args.warmup), two)
    measure("2x1", "PCIe 16 GB/s, 10 us (modeled)", patch_runs(args.warmup), [*two, *PCIE])
    working = memory_pass(base, args.out / "runs", args.warmup)

    ref = rows[0]["records"][0]
    base_latency = statistics.median(r["latency_s"] for r in rows[0]["records"])
    table = []
    for row in rows:
        recs = row["records"]
        latency = statistics.median(r["latency_s"] for r in recs)
        steps = recs[0]["comm_bytes_per_step"][0]
        per_step = statistics.median(steps.values() or [0])
        table.append({
            "run": row["run"], "layout": row["layout"], "link": row["link"],
            "latency_s": latency, "speedup": base_latency / latency,
            "psnr_image_db": psnr(_image(recs[0]), _image(ref), 255.0),
            "psnr_latents_db": psnr(_latents(recs[0]), _latents(ref),
                                     float(_latents(ref).max() - _latents(ref).min())),
            "bytes_per_step_per_rank": per_step,
            "bytes_per_image_per_rank": recs[0]["comm_bytes"][0],
            "peak_memory_mb_per_rank": [m / 2**20 for m in recs[0]["peak_memory_bytes"]],
            "working_memory_mb_per_rank": working.get((row["run"], row["layout"])),
            "latencies_s": [r["latency_s"] for r in recs],
        })
    setup = {"model": args.model, "size": args.size, "steps": args.steps,
             "warmup_steps": args.warmup, "repeats": args.repeats,
             "command": "python -m paraflow.bench_patch " + " ".join(argv or [])}
    (args.out / "bench_patch.json").write_text(json.dumps({"setup": setup, "rows": table},
                                                          indent=2))
    lines = [f"# patch parallelism, {args.model} {args.size}², {args.steps} steps "
             f"({args.warmup} warm-up after the first), median of {args.repeats}", "",
             "| run | layout | link | latency s | speedup | PSNR img dB | PSNR lat dB "
             "| bytes/step/rank | bytes/image/rank | peak MB/rank | working MB/rank |",
             "|" + "---|" * 11]
    for t in table:
        work = t["working_memory_mb_per_rank"]
        lines.append(
            f"| {t['run']} | {t['layout']} | {t['link']} | {t['latency_s']:.2f} | "
            f"{t['speedup']:.2f}× | {t['psnr_image_db']:.1f} | {t['psnr_latents_db']:.1f} | "
            f"{t['bytes_per_step_per_rank']:,.0f} | {t['bytes_per_image_per_rank']:,} | "
            + " / ".join(f"{m:.0f}" for m in t["peak_memory_mb_per_rank"]) + " | "
            + (" / ".join(f"{m:.0f}" for m in work) if work else "–") + " |")
    (args.out / "bench_patch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
