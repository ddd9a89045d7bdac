"""The planner against measurement: run the tiny model and compare each rank's planned working
memory, bytes sent and weights with what the run recorded.

    python -m paraflow.tools.plan_check --out bench-results/plan_check

Single device and sync/displaced patch parallelism on 2 gloo ranks × 1 thread, at --sizes
(default 256 and 512), --steps steps (displaced: 1 synchronous warm-up step after the first, so
half the steps are displaced). Working memory is run.json's `working_memory_bytes` (the rise of
the resident set over generation) with the resident set following live tensors
(paraflow.memory.track_live_tensors); each launch starts with a discarded run (one-time costs).
Writes plan_check.json and plan_check.md in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from paraflow.api import compose
from paraflow.many import launch_many, prepared
from paraflow.plan import make_plan

RUNS = {
    "single": ["launcher.devices=1"],
    "sync_patch": ["+strategy=sync_patch", "launcher.devices=2"],
    "displaced_patch": ["+strategy=displaced_patch", "strategy.warmup_steps=1",
                        "launcher.devices=2"],
}


def _error(predicted: float, measured: float) -> float | None:
    return None if not measured else (predicted - measured) / measured


def measure(sizes: list[int], steps: int, model: str, out: Path) -> list[dict[str, Any]]:
    """Every size and strategy, one launch per rank count; a row per run and rank."""
    shutil.rmtree(out / "runs", ignore_errors=True)  # this command's own earlier runs
    cases = [(name, size, prepared(compose([
        f"model={model}", f"height={size}", f"width={size}", f"steps={steps}",
        "launcher.threads_per_rank=1", "pipeline.progress=false", *overrides]),
        out / "runs" / f"{name}_{size}"))
        for size in sizes for name, overrides in RUNS.items()]
    records = launch_many([cfg for *_, cfg in cases], discard_first=True, track_memory=True)
    rows = []
    for (name, size, cfg), record in zip(cases, records):
        plan = make_plan(cfg)
        for rank, row in enumerate(plan.ranks):
            predicted = max(row.activations.values())
            measured = record["working_memory_bytes"][rank] or 0
            weights = sum(row.weights.values())
            param_bytes = sum(v[rank] for v in record["param_bytes"].values())
            rows.append({
                "run": name, "size": size, "rank": rank,
                "working_predicted": predicted, "working_measured": measured,
                "working_error": _error(predicted, measured),
                "denoise_predicted": row.activations["denoise"],
                "decode_predicted": row.activations["decode"],
                "carried_predicted": row.carried_bytes,
                "comm_predicted": row.comm_run, "comm_measured": record["comm_bytes"][rank],
                "comm_error": _error(row.comm_run, record["comm_bytes"][rank]),
                "weights_predicted": weights, "weights_measured": param_bytes,
            })
    return rows


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:+.1f}%"

    lines = [f"# plan check: {setup['model']}, {setup['steps']} steps, CPU (gloo, 1 thread/rank)",
             "", "Working memory: planned peak (max of denoise and decode, incl. exchange and "
             "stale buffers) vs run.json working_memory_bytes (resident set following live "
             "tensors). Bytes: everything the rank sent in the run. MB = 1e6 bytes.", "",
             "| size | run | rank | planned MB (denoise / decode) | measured MB | error "
             "| planned bytes | measured bytes | error | weights planned = measured |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['run']} | {r['rank']} | {r['working_predicted'] / 1e6:.1f} "
            f"({r['denoise_predicted'] / 1e6:.1f} / {r['decode_predicted'] / 1e6:.1f}) | "
            f"{r['working_measured'] / 1e6:.1f} | {pct(r['working_error'])} | "
            f"{r['comm_predicted']:,} | {r['comm_measured']:,} | {pct(r['comm_error'])} | "
            f"{'yes' if r['weights_predicted'] == r['weights_measured'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny_random")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-results/plan_check"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.sizes, args.steps, args.model, args.out)
    setup = {"model": args.model, "sizes": args.sizes, "steps": args.steps,
             "command": "python -m paraflow.tools.plan_check " + " ".join(argv or [])}
    (args.out / "plan_check.json").write_text(json.dumps({"setup": setup, "rows": rows},
                                                         indent=2))
    text = markdown(rows, setup)
    (args.out / "plan_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
