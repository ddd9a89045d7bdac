"""The image service measured on this machine, every figure from one invocation:

    python -m paraflow.tools.serve_bench --out bench-results/serve

- throughput: a fixed batch of --requests requests (--size, --steps), --clients per instance at
  once, through HAProxy to 1 instance × 1 thread and to 2 instances × 1 thread (and 1 × 2 threads
  beside): images/s and the ratio (the serving guide expects 1.8-2.0× on two devices);
- latency under load: Poisson arrivals at --load × the 2-instance throughput (below saturation, as
  MLPerf's server scenario): p50/p90/p99 of request latency;
- front-door overhead: the median of --probes one-step requests sent one at a time through
  HAProxy against the same to an instance directly;
- restart to readmit: SIGKILL of one instance until HAProxy has it up again;
- route by size (--mixed): a mixed load (--small requests at --size, --large at --large-size,
  all sent at once) on the same cores served by 2 single-device instances, by one 2-rank
  --group-strategy instance, and routed (1 single-device instance for the small images, the
  2-rank group for the large ones): the time until the last image, each against routed.

Writes serve_bench.json and serve_bench.md in --out. CPU figures are noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from paraflow.serve.local import LocalService, server_up

URL = "/v1/images/generations"


def _post(url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        answer = client.post(url + URL, json=body)
    if answer.status_code != 200:
        raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:200]}")
    return time.perf_counter() - start


def throughput(url: str, body: dict[str, Any], requests: int, clients: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: _post(url, {**body, "seed": i}), range(requests)))
    return requests / (time.perf_counter() - start)


def poisson_latencies(url: str, body: dict[str, Any], requests: int, rate: float,
                      seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    latencies: list[float] = []
    threads = []
    for i in range(requests):
        thread = threading.Thread(target=lambda i=i: latencies.append(
            _post(url, {**body, "seed": i})))
        thread.start()
        threads.append(thread)
        time.sleep(rng.expovariate(rate))
    for thread in threads:
        thread.join()
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def service(out: Path, name: str, instances: int, threads: int, model: str) -> LocalService:
    run = LocalService(out / name, instances, [f"model={model}",
                                               f"launcher.threads_per_rank={threads}",
                                               "serve.front.max_queue=1000",
                                               "serve.restart_backoff_s=0.2"])
    run.wait_ready()
    return run


def mixed(args: argparse.Namespace, body: dict[str, Any]) -> dict[str, float]:
    """Seconds until the last image of one mixed load, for each way of serving it."""
    large = f"{args.large_size}x{args.large_size}"
    load = ([{**body, "seed": i} for i in range(args.small)]
            + [{**body, "seed": i, "size": large} for i in range(args.large)])
    group = [f"+strategy={args.group_strategy}"]
    ways = {
        "two_single": (2, [], 1),
        "one_group": (2, group, 2),
        "routed": (3, ["serve.large.count=1", "serve.large.devices=2",
                       f"serve.large.min_pixels={args.large_size ** 2}",
                       f"serve.large.overrides=['+strategy={args.group_strategy}']"], 1),
    }
    found = {}
    for name, (devices, extra, ranks) in ways.items():
        run = LocalService(args.out / f"mixed-{name}", devices,
                           [f"model={args.model}", "launcher.threads_per_rank=1",
                            "serve.front.max_queue=1000", *extra], ranks_per_instance=ranks)
        try:
            run.wait_ready()
            _post(run.url, {**body, "steps": 1})
            start = time.perf_counter()
            with ThreadPoolExecutor(len(load)) as pool:
                seconds = list(pool.map(_post, [run.url] * len(load), load))
            found[f"mixed_{name}_s"] = time.perf_counter() - start
            found[f"mixed_{name}_small_p50_s"] = statistics.median(seconds[:args.small])
            found[f"mixed_{name}_large_p50_s"] = statistics.median(seconds[args.small:])
        finally:
            run.stop()
    for name in ("two_single", "one_group"):
        found[f"mixed_{name}_over_routed"] = found[f"mixed_{name}_s"] / found["mixed_routed_s"]
        found[f"mixed_{name}_large_p50_over_routed"] = (found[f"mixed_{name}_large_p50_s"]
                                                        / found["mixed_routed_large_p50_s"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/serve"))
    parser.add_argument("--model", default="tiny_random")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=2, help="per instance")
    parser.add_argument("--load", type=float, default=0.6)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--mixed", action="store_true", help="also the route-by-size figure")
    parser.add_argument("--mixed-only", action="store_true", help="only the route-by-size figure")
    parser.add_argument("--small", type=int, default=12)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--large-size", type=int, default=384)
    parser.add_argument("--group-strategy", default="distrifusion")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    body = {"prompt": "a red circle on the left", "size": f"{args.size}x{args.size}",
            "steps": args.steps}
    rows: dict[str, Any] = {"command": "python -m paraflow.tools.serve_bench "
                            + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                            "cores": os.cpu_count()}
    layouts = [] if args.mixed_only else [("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1)]
    for name, instances, threads in layouts:
        run = service(args.out, name, instances, threads, args.model)
        try:
            _post(run.url, {**body, "steps": 1})  # first request through the door
            rows[f"images_per_s_{name}"] = throughput(run.url, body, args.requests,
                                                      args.clients * instances)
            if name != "2x1":
                continue
            rate = args.load * rows["images_per_s_2x1"]
            latencies = poisson_latencies(run.url, body, args.requests * 2, rate)
            rows["poisson_rate_per_s"] = rate
            rows.update({f"latency_p{q}_s": percentile(latencies, q) for q in (50, 90, 99)})
            probe = {**body, "steps": 1, "size": "64x64"}
            through = [_post(run.url, probe) for _ in range(args.probes)]
            direct = [_post(run.instance_url("i0"), probe) for _ in range(args.probes)]
            rows["front_door_overhead_ms"] = 1000 * (statistics.median(through)
                                                      - statistics.median(direct))
            rows["direct_median_ms"] = 1000 * statistics.median(direct)
            victim = run.children()["i1"]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while server_up(run.exporter, "i1"):  # until HAProxy sees it go
                time.sleep(0.05)
            while not server_up(run.exporter, "i1"):
                time.sleep(0.05)
            rows["restart_to_readmit_s"] = time.monotonic() - killed
        finally:
            run.stop()
    if args.mixed or args.mixed_only:
        rows.update(mixed(args, body))
    if layouts:
        rows["speedup_2x1_over_1x1"] = rows["images_per_s_2x1"] / rows["images_per_s_1x1"]
        rows["speedup_1x2_over_1x1"] = rows["images_per_s_1x2"] / rows["images_per_s_1x1"]
    (args.out / "serve_bench.json").write_text(json.dumps(rows, indent=1))
    table = "\n".join(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in rows.items())
    text = f"# serve_bench\n\n| figure | value |\n|---|---|\n{table}\n"
    (args.out / "serve_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
