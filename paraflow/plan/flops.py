"""Floating-point operations of code run on the meta device, per denoising step: the matrix
products, convolutions and attention a rank computes (torch's own formulas,
`torch.utils.flop_counter`: 2 per multiply-add), from the shapes alone. Element-wise ops,
normalisations and the scheduler are left out (they are memory-bound and small beside them).

`Flops` is a TorchDispatchMode that books each op's count under its `step` (set by the replay
before each step; None outside the steps: the decode), as the communicator books the bytes of the
collectives. Fused attention reaches it whole on meta tensors
(`aten.scaled_dot_product_attention`), counted as its two products.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

SDPA = torch.ops.aten.scaled_dot_product_attention


class Flops(TorchDispatchMode):
    """FLOPs booked per step (`by_step`) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.by_step: dict[int | None, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is SDPA:  # from its shapes, as the fused kernel's two products
            query, key, value = args[:3]
            self.by_step[self.step] += int(sdpa_flop_count(query.shape, key.shape, value.shape))
        elif packet not in flop_registry and _composite(func):  # linear, conv2d, matmul
            with self:  # into the ops counted
                done = func.decompose(*args, **kwargs)
            if done is not NotImplemented:
                return done
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.by_step[self.step] += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


@functools.cache
def _composite(func: Any) -> bool:
    """Whether `func` is written in other ops (CompositeImplicitAutograd): on meta tensors in
    inference mode it reaches the mode whole."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), torch._C.DispatchKey.CompositeImplicitAutograd)
