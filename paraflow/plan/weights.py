"""Weight bytes per rank: each pipeline module at the precision of the stage that uses it (the last
one, as a run leaves it), the denoiser's share under tensor parallelism, and which modules stay
on the device between stages (the stage policies' placement and offload)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from paraflow.config import Offload, Placement, Precision
from paraflow.graph import execution_order
from paraflow.policy import DTYPES
from paraflow.strategies.tensor import PlannedSplit

PHASES = {"encode": ("text_encoder", "text_encoder_2"), "denoise": ("unet",), "decode": ("vae",)}


@dataclass(frozen=True)
class Policy:
    dtype: torch.dtype = torch.float32  # as loaded, for a module no stage uses
    on_device: bool = True  # placement compute
    resident: bool = True  # stays on the device after its stage (no offload)


def stage_policies(cfg: DictConfig) -> dict[str, Policy]:
    """Module name -> the policy of the last stage (in execution order) that uses it."""
    stages = cfg.pipeline.stages
    found: dict[str, Policy] = {}
    for name in execution_order(stages):
        spec = stages[name]
        policy = Policy(DTYPES[Precision(spec.precision)],
                        Placement(spec.placement) is Placement.compute,
                        Offload(spec.offload) is Offload.none)
        for component in getattr(get_class(spec._target_), "components", ()):
            found[component] = policy
    return found


def module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Parameter bytes once cast to `dtype` (what run.json's param_bytes counts; buffers are
    not parameters)."""
    return sum(p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())
               for p in module.parameters())


def tensor_share(model: nn.Module, splits: list[PlannedSplit], n: int,
                 dtype: torch.dtype) -> int:
    """Parameter bytes one of `n` tensor-parallel ranks holds: a split layer's weight is divided
    by n; its bias too, except after a row-wise or input-channel split (added once, after the
    all-reduce, so every rank keeps it whole); everything else stays whole."""
    whole = module_bytes(model, dtype)
    modules = dict(model.named_modules())
    saved = 0
    for split in splits:
        for name, param in modules[split.name].named_parameters(recurse=False):
            if split.style == "heads" or (name == "bias" and split.style in ("rowwise",
                                                                            "conv_in")):
                continue
            size = param.numel() * dtype.itemsize
            saved += size - size // n
    return whole - saved
