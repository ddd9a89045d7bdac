"""make_plan: a composed run config in, the per-rank plan out (see paraflow/plan/__init__.py)."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from paraflow.adapters import (
    added_condition_widths,
    latent_channels,
    unet_downsampling,
    uses_guidance,
)
from paraflow.errors import ParaflowError
from paraflow.mesh import world_of
from paraflow.models.skeleton import COMPONENTS, pipeline_skeleton, prompt_tokens
from paraflow.plan.comm import gather_by_index
from paraflow.plan.layout import modelled, rank_roles
from paraflow.plan.rank import RankWork, patch_decode_wanted
from paraflow.plan.report import Plan, RankPlan
from paraflow.plan.simulate import Inputs
from paraflow.plan.weights import PHASES, Policy, module_bytes, stage_policies, tensor_share
from paraflow.registry import build_strategy
from paraflow.run import expanded_prompts
from paraflow.strategies.tensor import TensorStrategy, resolve_plan
from paraflow.validate import model_factor, validate


def _inputs(cfg: DictConfig, unet: nn.Module, factor: int) -> Inputs:
    guidance = uses_guidance(unet, float(cfg.guidance_scale))
    latent = (latent_channels(unet), int(cfg.height) // factor, int(cfg.width) // factor)
    return Inputs(latent, prompt_tokens(cfg.model), guidance, added_condition_widths(unet))


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


def make_plan(cfg: DictConfig) -> Plan:
    """The plan of `cfg` (composed as paraflow.api.compose does); the same checks as a run,
    except those against this machine's devices. No weights are loaded."""
    validate(cfg, None, devices=False)
    parts = pipeline_skeleton(cfg.model)
    if not parts or "unet" not in parts or "vae" not in parts:
        raise ParaflowError(f"model={cfg.model.name}: the planner reads the model's config files "
                            "(unet/config.json, vae/config.json) and found none; give a local "
                            "pipeline folder (model.path), or plan an architecture preset: "
                            "model=sdxl_arch or model=sd15_arch")
    strategy = build_strategy(cfg.strategy)
    policies = stage_policies(cfg)
    factor = model_factor(cfg.model)
    denoiser: Any = parts["unet"]
    unit = unet_downsampling(denoiser)
    roles = rank_roles(cfg, strategy, unit, factor)
    inputs = _inputs(cfg, parts["unet"], factor)
    weights = {n: module_bytes(parts[n], policies.get(n, Policy()).dtype)
               for n in COMPONENTS if n in parts}
    budget, source = _budget(cfg)
    target = _target(cfg)
    cpu = target == "cpu"
    works: dict[tuple[Any, ...], RankWork] = {}
    rows = []
    if isinstance(strategy, TensorStrategy) and roles[0].tensor > 1:
        unet = parts["unet"]
        weights["unet"] = tensor_share(unet, resolve_plan(unet, strategy.plan), roles[0].tensor,
                                       policies["unet"].dtype)
    gathered = _gathered_row_bytes(cfg, inputs)
    for role in roles:
        if role.key() not in works:
            works[role.key()] = RankWork(cfg, role, inputs, policies, unit, cpu)
        work = works[role.key()]
        activations = {"denoise": work.peaks[0], "decode": work.peaks[1]}
        peak = _device_peak(weights, policies, activations, everything_resident=cpu)
        rows.append(RankPlan(
            role.rank, role.label, role.images, dict(weights), activations, work.stale,
            work.per_step, work.decode, gather_by_index(role.gather, role.gather_max, gathered),
            peak, None if budget is None else peak <= budget))
    summary = {
        "model": str(cfg.model.name), "height": int(cfg.height), "width": int(cfg.width),
        "strategy": strategy.mode, "world_size": world_of(cfg),
        "mesh": strategy.mesh_layout(world_of(cfg)), "steps": int(cfg.steps),
        "images": len(expanded_prompts(cfg)),
        "guidance": inputs.guidance,
        "precision": {n: str(policies.get(n, Policy()).dtype).removeprefix("torch.")
                      for n in weights},
        "patch_decode": patch_decode_wanted(cfg, strategy) and world_of(cfg) > 1,
        "target": target,
    }
    notes = [
        "weights: parameters at the precision of the last stage using each module; the device "
        "peak holds offloaded modules (pipeline.stages.*.offload=cpu) only during their stage"
        + (" (on CPU nothing is offloaded: all held)" if cpu else ""),
        "activations: the peak of live tensors in a meta-device replay of this rank's denoising "
        "step(s) and decode (strategy code included: exchange buffers, stale pieces, buckets in "
        "flight); fused attention (no score matrix); "
        + ("CPU convolutions' input copy included; " if cpu else "cuDNN workspace, ")
        + "allocator slack not included",
        "bytes sent as paraflow's communicator counts them (ring algorithms), per rank",
    ]
    if not modelled(strategy):
        notes.append(f"strategy {strategy.name}: planned by replaying its own setup, "
                     "parallelize and steps on meta tensors for every rank (bytes as its "
                     "collectives book them); weights as loaded, before any sharding it does; "
                     "its result gather is not planned")
    if cpu and world_of(cfg) > 1 and _accelerator(cfg) == "auto":
        notes.append("planned for CPU ranks (launcher.accelerator=auto on a machine without "
                     "CUDA); add launcher.accelerator=cuda to plan GPUs")
    return Plan(summary, rows, budget, source, notes)

