"""Stage policies: where a stage runs, in which precision, and whether its weights leave the
compute device afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from paraflow.config import Offload, Placement, Precision

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16,
          Precision.fp16: torch.float16}


@contextmanager
def applied_policy(
    spec: Any, modules: list[torch.nn.Module], compute_device: torch.device
) -> Iterator[tuple[torch.device, torch.dtype]]:
    """Move `modules` to the stage's device and dtype; offload them afterwards if asked."""
    placement = Placement(spec.placement)
    device = compute_device if placement is Placement.compute else torch.device("cpu")
    dtype = DTYPES[Precision(spec.precision)]
    for module in modules:
        _move(module, device, dtype)
    try:
        yield device, dtype
    finally:
        if Offload(spec.offload) is Offload.cpu:
            for module in modules:
                _move_device(module, torch.device("cpu"))


def _move_device(module: torch.nn.Module, device: torch.device) -> None:
    """Only when the module is elsewhere: a no-op move still swaps every parameter, which a
    module sharded by FSDP2 refuses (its tied weights cannot be swapped)."""
    if any(p.device != device for p in module.parameters()):
        module.to(device)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move only when something changes (diffusers warns on every dtype cast, even a no-op)."""
    first = next(module.parameters(), None)
    if first is None or (first.device == device and first.dtype == dtype):
        return
    if first.dtype == dtype:
        module.to(device=device)
    else:
        module.to(device=device, dtype=dtype)
