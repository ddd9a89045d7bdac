"""A run on every rank: its session (paraflow/session.py) makes the run's images; rank 0 writes
them with run.json, the record of what ran, where, how long and at what cost."""

from __future__ import annotations

import platform
import time
import warnings
from importlib.metadata import version
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from paraflow import memory
from paraflow.compile import compile_counts, compile_report
from paraflow.context import ParallelContext
from paraflow.models.tokenizer import unknown_words
from paraflow.outputs import write_outputs
from paraflow.session import Session
from paraflow.sizes import with_binned_size
from paraflow.validate import prompts_of


def expanded_prompts(cfg: DictConfig) -> list[str]:
    """One prompt per image, in output order: each prompt repeated images_per_prompt times."""
    return [p for p in prompts_of(cfg) for _ in range(int(cfg.images_per_prompt))]


def parameter_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of the parameters this rank holds, per pipeline module (a sharded parameter counts
    its local shard only)."""
    sizes: dict[str, int] = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            sizes[name] = 0
            for param in module.parameters():
                local = param.to_local() if hasattr(param, "to_local") else param  # DTensor
                sizes[name] += local.numel() * local.element_size()
    return sizes


def versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "lightning-fabric", "hydra-core")
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def warn_unknown_words(tokenizer: Any, texts: list[str]) -> None:
    """A small model knows few words: say which ones of the prompts it will not understand (the
    run still goes on). Only word-level tokenizers have unknown words; CLIP's BPE never does."""
    unknown = unknown_words(tokenizer, texts)
    if unknown:
        known = sorted(set(tokenizer.get_vocab()) - set(tokenizer.all_special_tokens))
        warnings.warn(f"the model does not know the word(s) {', '.join(unknown)}; they are "
                      f"ignored. It knows: {' '.join(known)}", UserWarning, stacklevel=2)


def run_on_rank(ctx: ParallelContext, cfg: DictConfig) -> dict[str, Any] | None:
    """The run on this rank: its session, one generation of every prompt, the record (rank 0
    writes the outputs and returns it)."""
    session = Session(ctx, cfg)
    strategy, pipe = session.strategy, session.pipe
    prompts = expanded_prompts(cfg)
    if ctx.is_main:
        warn_unknown_words(pipe.tokenizer, [*prompts, cfg.negative_prompt or ""])
    ctx.comm.barrier()  # time the generation only, from a common start
    held = memory.start_window(ctx.device)
    compiled_before = compile_counts()
    start = time.perf_counter()
    done = session.generate(cfg, prompts, bool(cfg.save_latents or cfg.save_trajectory))
    latency = time.perf_counter() - start
    working = memory.window_peak_bytes(ctx.device, held)
    gathered, env, mine = done.sink, done.env, done.image_ids

    comm_bytes = ctx.comm.total_bytes
    by_step = ctx.comm.bytes_by_step
    per_step = {str(k): v for k, v in by_step.items() if k is not None}
    stats = ctx.comm.gather_objects(
        {"comm_bytes": comm_bytes, "comm_bytes_per_step": per_step,
         "comm_bytes_outside_steps": by_step.get(None, 0),  # decode, gathers of results
         "peak_memory_bytes": memory.process_peak_bytes(ctx.device),
         "working_memory_bytes": working, "latency_s": latency,
         "stages": dict(env.seconds), "n_images": len(mine),
         "denoiser_calls": env.denoiser_calls.full,
         "reused_steps": env.denoiser_calls.reused,
         "compile": compile_report(compiled_before),
         "param_bytes": parameter_bytes(pipe)})
    if not ctx.is_main:
        return None
    binned = with_binned_size(cfg)
    record = {
        "strategy": strategy.name,
        "world_size": ctx.world_size,
        "model": cfg.model.name,
        "height": cfg.height,
        "width": cfg.width,
        "steps": cfg.steps,
        # resolution binning's size (paraflow/sizes.py): the images are resized from it
        "generated_size": [int(binned.height), int(binned.width)],
        "n_images": len(prompts),
        "latency_s": max(s["latency_s"] for s in stats),
        "images_per_s": len(prompts) / max(s["latency_s"] for s in stats),
        "stages": dict(env.seconds),
        # Per rank: full denoiser calls, and the steps a step cache reused (paraflow/cache).
        "denoiser_calls": [s["denoiser_calls"] for s in stats],
        "reused_steps": [s["reused_steps"] for s in stats],
        # Per rank: graphs compiled and graph breaks by reason (paraflow/compile.py).
        "compile": [s["compile"] for s in stats],
        "comm_bytes": [s["comm_bytes"] for s in stats],
        "comm_bytes_per_step": [s["comm_bytes_per_step"] for s in stats],
        "comm_bytes_outside_steps": [s["comm_bytes_outside_steps"] for s in stats],
        "peak_memory_bytes": [s["peak_memory_bytes"] for s in stats],
        "working_memory_bytes": [s["working_memory_bytes"] for s in stats],
        "param_bytes": {k: [s["param_bytes"][k] for s in stats] for k in stats[0]["param_bytes"]},
        "images_per_rank": [s["n_images"] for s in stats],
        "threads_per_rank": torch.get_num_threads(),
        "device": str(ctx.device),
        "link": ctx.comm.link.label() if ctx.comm.link is not None else "real transport",
        "strategy_mode": strategy.mode,
        "mesh": strategy.mesh_layout(ctx.world_size),  # named dimensions, outermost first
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
    }
    images = write_outputs(cfg.output_dir, gathered, record)
    return {**record, "images": images, "output_dir": cfg.output_dir}


def run_each_on_rank(ctx: ParallelContext, cfg: DictConfig,
                     runs: list[dict[str, Any]]) -> list[Any]:
    """Several runs one after another in one launch (benchmarks, tests): each gets a fresh
    context, so its own byte count and its own mesh. `cfg` is the launch's (unused here)."""
    from paraflow.launcher import rank_context

    records = []
    for run in runs:
        run_cfg = OmegaConf.create(run)
        fresh = rank_context(run_cfg, ctx.rank, ctx.world_size, ctx.local_rank, ctx.device)
        records.append(run_on_rank(fresh, run_cfg))
    return records

