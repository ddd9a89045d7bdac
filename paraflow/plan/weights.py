"""Weight bytes per rank: each pipeline module at the precision of the stage that uses it (the last
one, as a run leaves it), as the strategy's parallelize leaves it (a shard counts its local part),
and which modules stay on the device between stages (the stage policies' placement and
offload)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from paraflow.config import Offload, Placement, Precision
from paraflow.graph import execution_order
from paraflow.models.components import TEXT_ENCODERS
from paraflow.policy import DTYPES

PHASES = {"encode": TEXT_ENCODERS, "denoise": ("unet", "transformer"),
          "decode": ("vae",)}


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
    """Parameter bytes once cast to `dtype`, a sharded parameter's local shard only (what
    run.json's param_bytes counts; buffers are not parameters)."""
    total = 0
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # DTensor
        total += local.numel() * (dtype.itemsize if local.is_floating_point()
                                  else local.element_size())
    return total
