"""The checks that need a GPU, as one command (scripts/gpu_check.sh runs it under a time limit):

    python -m paraflow.tools.gpu_check --out gpu-check            # on a machine with one CUDA GPU
    python -m paraflow.tools.gpu_check --device cpu --quick       # the same code, tiny, on a CPU

1. parity: one device, fp16 (cpu: fp32) for every stage, paraflow against stock diffusers
   driven on the same components with the same seed, for the default model and `sdxl_arch`
   (quick: `tiny_xl_random`); max |Δ| of the final latents and PSNR of the image.
2. bands: the denoiser's compute time on 1, 2, 4 and 8 bands of rows of `sdxl_arch`,
   `flux_arch` and `pixart_sigma_arch` at 2048² (quick: `tiny_xl_random`, `tiny_flux_random` at
   256²), each band's call against the whole image's / N: the compute ceiling of patch
   parallelism (no communication, synchronized timers, median of 5).
3. device: what the service exports of the device (paraflow/devices.py: memory, and
   NVML's utilization, temperature, power and throttle reasons on CUDA).
4. shared: `sync_patch` on 2 ranks sharing the one device over gloo with device tensors, against
   one device within 1e-4; if gloo refuses device tensors for a collective, which one.
5. accelerate: one device, `flux_arch` at 1024² and the default model at 512² (quick:
   `tiny_flux_random` and `tiny` at 64²), fp16 on CUDA: eager, each step cache, regional and
   full compile (inductor; CUDA graphs with mode=reduce-overhead; quick on CPU: dynamo's
   capture only), and the flash SDPA kernel: the median latency of 3 runs after a warm-up that
   compiles, the speedup over eager, denoiser calls, graph breaks, PSNR against eager.

Writes gpu_check.json and gpu_check.md into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from paraflow import metrics

PROMPT = "a red circle on the left, blue background"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(model: str, size: int, steps: int, device: torch.device) -> dict[str, Any]:
    """paraflow's single-device run against the stock pipeline on the same components."""
    from paraflow.api import compose
    from paraflow.context import ParallelContext
    from paraflow.families import denoiser_call
    from paraflow.models import load_pipeline
    from paraflow.run import run_on_rank
    from paraflow.tools.parity import _outputs

    half = "fp16" if device.type == "cuda" else "fp32"
    cfg = compose([f"model={model}", f"height={size}", f"width={size}", f"steps={steps}",
                   f"prompt='{PROMPT}'", "seed=3", "save_latents=true", "pipeline.progress=false",
                   *[f"pipeline.stages.{s}.precision={half}" for s in ("encode", "denoise",
                                                                         "decode")],
                   "pipeline.stages.encode.offload=none", "pipeline.stages.decode.offload=none"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = str(Path(tmp) / "run")
        record = run_on_rank(ParallelContext.single(device), cfg)
        assert record is not None
        ours_s = float(record["latency_s"])  # generation only, as the stock timing below
        image, saved = _outputs(record)
    dtype = torch.float16 if half == "fp16" else torch.float32
    pipe = load_pipeline(cfg.model, cfg.scheduler).to(device=device, dtype=dtype)
    kwargs: dict[str, Any] = dict(prompt=PROMPT, height=size, width=size,
                                  num_inference_steps=steps,
                                  guidance_scale=float(cfg.guidance_scale))
    start = time.perf_counter()
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(3),
                   output_type="latent").images.float().cpu()
    stock_s = time.perf_counter() - start
    stock = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    stock_image = (stock * 255).round().astype(np.uint8)
    ours = saved["latents"].float()
    return {"model": model, "size": size, "steps": steps, "precision": half,
            "family": denoiser_call(pipe).family.name,
            "max_abs_latents": float((ours - latents).abs().max()),
            "psnr_image_db": metrics.psnr(image, stock_image, 255.0),
            "paraflow_s": ours_s, "stock_s": stock_s}


def bands(model: str, size: int, device: torch.device, repeats: int = 5) -> list[dict[str, Any]]:
    """Median time of one denoiser call (UNet or transformer, through the adapter as a run calls
    it) on a band of 1/N of the latent rows, N = 1, 2, 4, 8. The denoiser is built on the meta
    device and given random weights on `device` (no text encoders, no VAE, no CPU copy)."""
    from paraflow.api import compose
    from paraflow.families import Conditioning, denoiser_call
    from paraflow.models.configured import configured_latent_downsampling
    from paraflow.models.skeleton import denoiser_skeleton, prompt_tokens

    cfg = compose([f"model={model}"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    net = denoiser_skeleton(cfg.model).to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.02)
    rows = size // configured_latent_downsampling(cfg.model)
    tokens = prompt_tokens(cfg.model)
    call = denoiser_call(net)
    family, config = call.family, net.config
    batch = 2 if family.uses_guidance(config, 5.0) else 1
    extras = family.conditioning_extras(config, tokens) or {}
    added = {k: (torch.ones if k.endswith("mask") else torch.randn)(
        batch, *shape, device=device, dtype=dtype) for k, shape in extras.items()}
    cond = Conditioning(torch.randn(batch, tokens, family.context_width(config), device=device,
                                    dtype=dtype), added or None)
    t = torch.tensor(500.0, device=device)
    out = []
    for n in (1, 2, 4, 8):
        sample = torch.randn(batch, family.latent_channels(config), rows // n, rows, device=device,
                             dtype=dtype)
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first call warms up kernels and allocator
                _sync(device)
                start = time.perf_counter()
                call(sample, t, cond)
                _sync(device)
                times.append(time.perf_counter() - start)
        out.append({"bands": n, "band_rows": rows // n, "seconds": statistics.median(times[1:])})
    whole = out[0]["seconds"]
    for row in out:
        row["speedup_ceiling"] = whole / row["seconds"]  # if N bands ran at once
    return out


def _shared_rank(rank: int, world: int, port: int, device: str, result: str) -> None:
    """One of 2 ranks on the same device over gloo: sync_patch, device tensors."""
    import torch.distributed as dist

    from paraflow.launcher import rank_context
    from paraflow.run import run_on_rank
    from paraflow.tools.parity import _outputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict[str, Any] = {}
    try:
        cfg = _shared_cfg(world, str(Path(result).parent / "shared"))
        ctx = rank_context(cfg, rank, world, rank, torch.device(device))
        record = run_on_rank(ctx, cfg)
        if record is not None:
            report["latents"] = _outputs(record)[1]["latents"].tolist()
    except Exception as err:  # noqa: BLE001 - the report says which collective gloo refused
        report["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        report["where"] = traceback.format_exc().splitlines()[-3:]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(result).write_text(json.dumps(report))


def _shared_cfg(world: int, output_dir: str) -> Any:
    from paraflow.api import compose

    cfg = compose(["model=tiny_random", "height=64", "width=64", "steps=3", "save_latents=true",
                   "pipeline.progress=false", f"launcher.devices={world}",
                   "+strategy=sync_patch"] if world > 1 else
                  ["model=tiny_random", "height=64", "width=64", "steps=3", "save_latents=true",
                   "pipeline.progress=false"])
    cfg.output_dir = output_dir
    return cfg


def shared(device: torch.device) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    from paraflow.context import ParallelContext
    from paraflow.run import run_on_rank
    from paraflow.tools.parity import _outputs

    with tempfile.TemporaryDirectory() as tmp:
        single = run_on_rank(ParallelContext.single(device), _shared_cfg(1, f"{tmp}/single"))
        assert single is not None
        reference = _outputs(single)[1]["latents"]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result = Path(tmp) / "shared.json"
        mp.start_processes(_shared_rank, args=(2, port, str(device), str(result)), nprocs=2,
                           join=True, start_method="spawn")
        report = json.loads(result.read_text())
    if "error" in report:
        return {"ok": False, **report}
    diff = float((torch.tensor(report["latents"]) - reference).abs().max())
    return {"ok": diff <= 1e-4, "max_abs_latents": diff}


ACCELERATIONS = {  # name → overrides (D: the denoise stage), with what each needs
    "eager": [],
    "first_block 0.1": ["{D}cache=first_block", "{D}cache_options.threshold=0.1"],
    "taylorseer 3": ["{D}cache=taylorseer", "{D}cache_options.interval=3"],  # transformers
    "deepcache 3": ["{D}cache=deepcache", "{D}cache_options.interval=3"],  # UNets
    "regional": ["{D}compile=regional"],
    "full": ["{D}compile=full"],
    "regional reduce-overhead": ["{D}compile=regional", "{D}compile_options.mode=reduce-overhead"],
    "regional + first_block 0.1": ["{D}compile=regional", "{D}cache=first_block",
                                   "{D}cache_options.threshold=0.1"],
    "sdpa_flash": ["attention.backend=sdpa_flash"],
}


def accelerate(model: str, size: int, steps: int, device: torch.device,
               repeats: int = 3) -> list[dict[str, Any]]:
    """Each acceleration of ACCELERATIONS the model takes, on one device, against eager."""
    from paraflow.api import compose, generate
    from paraflow.errors import ParaflowError
    from paraflow.validate import validate

    cuda = device.type == "cuda"
    half = [f"pipeline.stages.{s}.precision=fp16" for s in ("encode", "denoise", "decode")]
    base = [f"model={model}", f"height={size}", f"width={size}", f"steps={steps}",
            f"prompt='{PROMPT}'", "seed=3", "pipeline.progress=false",
            f"launcher.accelerator={device.type}", *(half if cuda else [])]
    rows: list[dict[str, Any]] = []
    reference = None
    for name, template in ACCELERATIONS.items():
        overrides = [o.format(D="pipeline.stages.denoise.") for o in template]
        if not cuda and any(o.startswith("pipeline.stages.denoise.compile=") for o in overrides):
            overrides.append("pipeline.stages.denoise.compile_options.backend=eager")
        cfg = compose([*base, *overrides])
        try:  # a cache kind the family does not take, CUDA graphs or flash on a CPU
            validate(cfg, None)
        except ParaflowError as error:
            rows.append({"name": name, "skipped": str(error)})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            seconds, record = [], {}
            for attempt in range(repeats + 1):  # the first compiles (and warms the allocator)
                out = Path(tmp) / f"run{attempt}"
                record = generate(cfg, out)
                if attempt:
                    seconds.append(float(record["latency_s"]))
            image = np.asarray(Image.open(out / record["images"][0]))
        latency = statistics.median(seconds)
        if reference is None:
            reference = (latency, image)
        rows.append({"name": name, "latency_s": latency,
                     "speedup": reference[0] / latency,
                     "denoiser_calls": record["denoiser_calls"][0],
                     "graph_breaks": sum(record["compile"][0]["graph_breaks"].values()),
                     "psnr_image_db": metrics.psnr(image, reference[1], 255.0)})
        print(model, rows[-1], flush=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU check on {results['device_name']}", "",
             "| parity | size | precision | max abs Δ latents | PSNR image dB | paraflow s | "
             "stock s |", "|---|---|---|---|---|---|---|"]
    for p in results["parity"]:
        lines.append(f"| {p['model']} | {p['size']}² | {p['precision']} | "
                     f"{p['max_abs_latents']:.2e} | {p['psnr_image_db']:.1f} | "
                     f"{p['paraflow_s']:.2f} | {p['stock_s']:.2f} |")
    for case in results["bands"]:
        lines += ["", f"Denoiser per band, {case['model']} at {case['size']}²:", "",
                  "| bands | band rows | seconds per call | ceiling (whole / band) |",
                  "|---|---|---|---|"]
        lines += [f"| {b['bands']} | {b['band_rows']} | {b['seconds']:.4f} | "
                  f"{b['speedup_ceiling']:.2f}× |" for b in case["rows"]]
    for case in results.get("accelerate", []):
        lines += ["", f"Accelerations on one device, {case['model']} at {case['size']}²:", "",
                  "| acceleration | latency s | speedup | denoiser calls | graph breaks | "
                  "PSNR image dB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | skipped: {r['skipped']} | | | | |" if "skipped" in r else
                  f"| {r['name']} | {r['latency_s']:.3f} | {r['speedup']:.2f}× | "
                  f"{r['denoiser_calls']} | {r['graph_breaks']} | {r['psnr_image_db']:.1f} |"
                  for r in case["rows"]]
    lines += ["", f"The device as the service exports it: {results['device']}"]
    lines += ["", f"2 ranks sharing the device over gloo (sync_patch): {results['shared']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    cases = ([("tiny", 64, 4), ("tiny_xl_random", 64, 3)] if args.quick
             else [("tiny", 256, 20), ("sdxl_arch", 1024, 20)])
    band_cases = ([("tiny_xl_random", 256), ("tiny_flux_random", 256)] if args.quick else
                  [("sdxl_arch", 2048), ("flux_arch", 2048), ("pixart_sigma_arch", 2048)])
    results: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "parity": [], "bands": []}
    for model, size, steps in cases:
        results["parity"].append(parity(model, size, steps, device))
        print(results["parity"][-1], flush=True)
    for model, size in band_cases:
        results["bands"].append({"model": model, "size": size,
                                 "rows": bands(model, size, device)})
        print(results["bands"][-1], flush=True)
    from paraflow.devices import sample

    results["device"] = sample(device, 0)
    print(results["device"], flush=True)
    results["shared"] = shared(device)
    results["accelerate"] = [
        {"model": model, "size": size,
         "rows": accelerate(model, size, steps, device, repeats=1 if args.quick else 3)}
        for model, size, steps in ([("tiny_flux_random", 64, 6), ("tiny", 64, 6)] if args.quick
                                   else [("flux_arch", 1024, 20), ("tiny", 512, 20)])]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
