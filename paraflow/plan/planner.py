"""make_plan: a composed run config in, the per-rank plan out (see paraflow/plan/__init__.py)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from paraflow.errors import ParaflowError
from paraflow.families import family_of
from paraflow.mesh import world_of
from paraflow.models.skeleton import COMPONENTS, pipeline_skeleton, prompt_tokens
from paraflow.plan.cache import RATE, PlannedCache, planned_cache
from paraflow.plan.rank import RankWork, patch_decode_wanted
from paraflow.plan.report import Plan, RankPlan
from paraflow.plan.seats import Seat, seats
from paraflow.plan.simulate import Inputs
from paraflow.plan.weights import PHASES, Policy, module_bytes, stage_policies
from paraflow.plugin import plan_notes
from paraflow.run import expanded_prompts
from paraflow.sizes import with_binned_size
from paraflow.validate import model_factor, validate


def _inputs(cfg: DictConfig, model: nn.Module, factor: int) -> Inputs:
    family, config = family_of(model), getattr(model, "config", {})
    guidance = family.uses_guidance(config, float(cfg.guidance_scale))
    latent = (family.latent_channels(config), int(cfg.height) // factor,
              int(cfg.width) // factor)
    tokens = prompt_tokens(cfg.model)
    return Inputs(latent, tokens, guidance, family.conditioning_extras(config, tokens))


def _accelerator(cfg: DictConfig) -> str:
    wanted = cfg.launcher.accelerator
    return str(getattr(wanted, "value", wanted))


def _target(cfg: DictConfig) -> str:
    """The device kind the run would use: launcher.accelerator, auto resolved on this machine
    (plan GPUs from a laptop with launcher.accelerator=cuda)."""
    if _accelerator(cfg) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return _accelerator(cfg)


def _gathered_row_bytes(cfg: DictConfig, inputs: Inputs) -> list[int]:
    """Bytes per image of each result gather: its id, its uint8 pixels, its latents if kept."""
    rows = [8, int(cfg.height) * int(cfg.width) * 3]
    trajectory = bool(cfg.get("save_trajectory", False))
    if cfg.save_latents or trajectory:
        channels, height, width = inputs.latent
        rows.append((int(cfg.steps) if trajectory else 1) * 4 * channels * height * width)
    return rows


def _gather_bytes(seat: Seat, images_of: list[int], row_bytes: list[int]) -> int:
    """The default gather (paraflow.outputs.gather_by_index) over the seat's result_comm: per
    entry of `row_bytes` (ids: 8, images, latents when kept) one all-gather of the int64 count,
    then one of the most images a member holds, padded (ring: a piece times N−1)."""
    comm = seat.strategy.result_comm(seat.ctx)
    if comm is None or comm.world_size == 1:
        return 0
    most = max(images_of[m] for m in comm.members)
    return sum((8 + most * size) * (comm.world_size - 1) for size in row_bytes)


def _budget(cfg: DictConfig) -> tuple[int | None, str]:
    if cfg.get("plan_memory_gb") is not None:
        return int(float(cfg.plan_memory_gb) * 1e9), "plan_memory_gb"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"{props.name}, this machine's CUDA device 0"
    return None, "none: set plan_memory_gb, or plan on a machine with the GPU"


def _device_peak(weights: dict[str, int], policies: dict[str, Policy],
                 activations: dict[str, int], everything_resident: bool) -> int:
    """Resident weights, plus at each phase its own modules (if offloaded) and activations."""
    def policy(name: str) -> Policy:
        return policies.get(name, Policy())

    resident = sum(b for n, b in weights.items()
                   if everything_resident or (policy(n).on_device and policy(n).resident))
    peak = resident
    for phase, names in PHASES.items():
        visiting = sum(weights.get(n, 0) for n in names if not everything_resident
                       and policy(n).on_device and not policy(n).resident)
        on_device = everything_resident or policy(names[0]).on_device
        peak = max(peak, resident + visiting + (activations.get(phase, 0) if on_device else 0))
    return peak


def _cache_note(cache: PlannedCache) -> str:
    reused = len(cache.reuse) - cache.full_calls
    why = "its schedule of step numbers" if cache.source == "schedule" else cache.source
    if cache.source.startswith(f"{RATE}="):
        why += ", spread evenly"
    return (f"step cache {cache.kind} (pipeline.stages.{cache.stage}): {cache.full_calls} full "
            f"denoiser call(s) for {len(cache.reuse)} steps, {reused} reused (hit rate "
            f"{cache.hit_rate:.3g} of the steps after the first, from {why}); replayed with the "
            "cache installed: a reused step's skipped blocks compute and exchange nothing, "
            "their cached features are held between steps (carried)"
            + ("; each step after the first all-reduces the decision's 2 float64 sums over "
               "the ranks sharing the image" if cache.decides else ""))


def make_plan(cfg: DictConfig) -> Plan:
    """The plan of `cfg` (composed as paraflow.api.compose does); the same checks as a run,
    except those against this machine's devices. No weights are loaded."""
    cfg = with_binned_size(cfg)  # planned at the size generated at
    validate(cfg, None, devices=False)
    parts = pipeline_skeleton(cfg.model)
    model = None if not parts else parts.get("unet", parts.get("transformer"))
    if not parts or model is None or "vae" not in parts:
        raise ParaflowError(f"model={cfg.model.name}: the planner reads the model's config files "
                            "(unet/ or transformer/config.json, vae/config.json) and found none; "
                            "give a local pipeline folder (model.path), or plan an architecture "
                            "preset: model=sdxl_arch, sd15_arch or pixart_sigma_arch")
    cache, cache_notes = planned_cache(cfg)
    policies = stage_policies(cfg)
    factor = model_factor(cfg.model)
    inputs = _inputs(cfg, model, factor)
    loaded = {n: module_bytes(parts[n], policies.get(n, Policy()).dtype)
              for n in COMPONENTS if n in parts}
    budget, source = _budget(cfg)
    target = _target(cfg)
    cpu = target == "cpu"
    every = seats(cfg)
    images_of = [seat.images for seat in every]
    gathered = _gathered_row_bytes(cfg, inputs)
    works: dict[tuple[Any, ...], RankWork] = {}
    rows = []
    for seat in every:
        if seat.key not in works:
            works[seat.key] = RankWork(cfg, seat, inputs, policies, cpu, cache)
        work = works[seat.key]
        weights = {**loaded, **work.weights}
        activations = {"denoise": work.peaks[0], "decode": work.peaks[1]}
        peak = _device_peak(weights, policies, activations, everything_resident=cpu)
        rows.append(RankPlan(
            seat.rank, seat.label, seat.images, weights, activations, work.carried,
            work.per_step, work.decode, _gather_bytes(seat, images_of, gathered),
            peak, None if budget is None else peak <= budget, work.flops_per_step,
            work.flops_decode, work.denoiser_calls, work.encode))
    strategy = every[0].strategy
    summary = {
        "model": str(cfg.model.name), "height": int(cfg.height), "width": int(cfg.width),
        "strategy": strategy.mode, "world_size": world_of(cfg),
        "mesh": strategy.mesh_layout(world_of(cfg)), "steps": int(cfg.steps),
        "images": len(expanded_prompts(cfg)),
        "guidance": inputs.guidance,
        "precision": {n: str(policies.get(n, Policy()).dtype).removeprefix("torch.")
                      for n in loaded},
        "patch_decode": patch_decode_wanted(cfg, strategy) and world_of(cfg) > 1,
        "target": target,
        "replayed_ranks": len(works),
        "cache": cache.summary() if cache is not None else {"kind": "none"},
    }
    notes = [
        f"strategy {strategy.name}: planned by replaying its own setup, parallelize and steps "
        f"on meta tensors, over collectives that move nothing ({len(works)} of "
        f"{len(every)} rank(s) replayed; the others are alike, by the strategy's alike_key)",
        "weights: parameters at the precision of the last stage using each module, as the "
        "strategy's parallelize leaves them; the device peak holds offloaded modules "
        "(pipeline.stages.*.offload=cpu) only during their stage"
        + (" (on CPU nothing is offloaded: all held)" if cpu else ""),
        "activations: the peak of live tensors in the replay of this rank's denoising step(s) "
        "and decode (exchange buffers, stale pieces, buckets in flight); fused attention (no "
        "score matrix); "
        + ("CPU convolutions' input copy included; " if cpu else "cuDNN workspace, ")
        + "allocator slack not included; carried: what the strategy holds from one step to "
        "the next (displaced patch: the stale pieces)",
        "bytes sent as paraflow's communicator counts them (ring algorithms), per rank; the "
        "result gather as the default gather over the strategy's result_comm",
        "FLOP: the matrix products, convolutions and attention each rank computes (2 per "
        "multiply-add; element-wise ops left out); calls: full denoiser calls",
        *cache_notes,
    ]
    if cache is not None:
        notes.append(_cache_note(cache))
    notes += plan_notes(strategy, cfg)  # the strategy's own figures (PlanNotes)
    if cpu and world_of(cfg) > 1 and _accelerator(cfg) == "auto":
        notes.append("planned for CPU ranks (launcher.accelerator=auto on a machine without "
                     "CUDA); add launcher.accelerator=cuda to plan GPUs")
    return Plan(summary, rows, budget, source, notes)
