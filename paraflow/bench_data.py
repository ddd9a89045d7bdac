"""Foundation figures: single-device latency per resolution, and data-parallel throughput.

    python -m paraflow.bench_data [--out DIR] [--repeats 3] [--sizes 64 256 512] [--prompts 8]
                                  [--throughput-size 64]

Each figure is the median of `repeats` runs (generation only, model loading excluded), all
measured in this one invocation, one thread per rank. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from paraflow.api import compose, generate

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star",
           "a white ring", "a purple cross", "an orange diamond", "a pink circle"]


def median_run(overrides: list[str], repeats: int, scratch: Path) -> dict[str, Any]:
    records = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(dir=scratch))
        records.append(generate(compose([*overrides, "pipeline.progress=false"]), out / "run"))
    latencies = [r["latency_s"] for r in records]
    return {"latency_s": statistics.median(latencies), "runs_s": latencies,
            "images": records[0]["n_images"],
            "comm_bytes": records[0]["comm_bytes"],
            "peak_memory_bytes": records[0]["peak_memory_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-results/data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--throughput-size", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="paraflow-bench-"))
    base = [f"steps={args.steps}", "launcher.threads_per_rank=1"]

    latency = {}
    for size in args.sizes:
        latency[size] = median_run([*base, f"height={size}", f"width={size}"],
                                   args.repeats, scratch)
        print(f"single device {size}²: {latency[size]['latency_s']:.3f} s (median)", flush=True)

    prompts = "prompt=[" + ",".join(f"'{p}'" for p in (PROMPTS * 4)[: args.prompts]) + "]"
    throughput = {}
    for ranks in (1, 2):
        strategy = ["+strategy=data", f"launcher.devices={ranks}"] if ranks > 1 else []
        size = args.throughput_size
        result = median_run([*base, prompts, *strategy, f"height={size}", f"width={size}"],
                            args.repeats, scratch)
        result["images_per_s"] = result["images"] / result["latency_s"]
        throughput[ranks] = result
        print(f"data, {ranks} rank(s) × 1 thread: {result['images_per_s']:.2f} images/s",
              flush=True)
    speedup = throughput[2]["images_per_s"] / throughput[1]["images_per_s"]

    results = {"steps": args.steps, "repeats": args.repeats, "latency": latency,
               "throughput": throughput, "data_speedup_2_over_1": speedup}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| resolution | single-device latency (s, median) |", "|---|---|"]
    lines += [f"| {s}² | {latency[s]['latency_s']:.3f} |" for s in args.sizes]
    lines += ["", f"| ranks × threads | images/s ({args.prompts} prompts, "
              f"{args.throughput_size}²) | speedup |",
              "|---|---|---|"]
    lines += [f"| {r} × 1 | {throughput[r]['images_per_s']:.2f} | "
              f"{throughput[r]['images_per_s'] / throughput[1]['images_per_s']:.2f}× |"
              for r in (1, 2)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
