"""Guidance (cfg) parallelism for strategies that keep whole images (tensor): the denoiser's
batch [unconditional; conditional] is halved over the ranks of the mesh dimension `cfg`.

Split: the batch of every denoiser call. Communicated: one all-gather of the output halves per
call, so every rank holds the whole noise prediction. Forward hooks on the denoiser's call
(paraflow.families.DenoiserCall), whatever the family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paraflow.comm import Communicator
from paraflow.families.call import call_latents, split_call


class GuidanceSplit:
    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def install(self, model: nn.Module) -> list[Any]:
        return [model.register_forward_pre_hook(self.before, with_kwargs=True),
                model.register_forward_hook(self.after)]

    def before(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        sample = call_latents(args, kwargs)
        parts = self.comm.world_size
        if sample.shape[0] % parts:
            raise RuntimeError(f"guidance split needs an even batch, got {sample.shape[0]}")
        size = sample.shape[0] // parts
        mine = slice(self.comm.rank * size, (self.comm.rank + 1) * size)
        return split_call(args, kwargs, mine)

    def after(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        return torch.cat(self.comm.all_gather(output))
