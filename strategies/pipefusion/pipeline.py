"""The patch pipeline around the denoiser call: one call of the loop becomes one model call per
patch on every stage, the patches flowing through the stages in order.

Split: the image's latent rows into M patches of whole token rows (one patch, the whole image,
on warm-up steps), and with the guidance split the batch into its two halves. Each stage runs
every patch through its blocks: patch p leaves stage s (point to point, asynchronously) as stage
s works on patch p + 1, so N stages work at once once the pipeline is full (M + N − 1 patch
times a step; the scheduler steps the whole latent on every rank between steps, so each step
fills and drains the pipeline). Communicated at the end of the call: the last stage's
prediction (its patches in order; with the guidance split, both halves all-gathered between the
two last stages) broadcast to the stages, so every rank steps the same latents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paraflow.comm import Communicator
from paraflow.families.call import call_latents, split_call
from paraflow.strategies.patch.bands import BandPlan, band_sizes
from paraflow.strategies.pipefusion.stages import ForwardHook, StageDone
from paraflow.strategies.pipefusion.state import PipeState


class PatchPipeline(ForwardHook):
    """Installed on the DenoiserCall (diffusers' hook registry: it replaces the forward).
    `parts`: the batch parts (1, or 2 with the guidance split), this rank's is `part`;
    `cfg_comm`: the ranks holding the same stage of each part."""

    def __init__(self, state: PipeState, patches: int, unit: int, parts: int, part: int,
                 cfg_comm: Communicator) -> None:
        super().__init__()
        self.state, self.patches, self.unit = state, patches, unit
        self.parts, self.part, self.cfg_comm = parts, part, cfg_comm

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        call: Any = module  # the DenoiserCall
        state = self.state
        latents = call_latents(args, kwargs)
        batch, rows = latents.shape[0], latents.shape[-2]
        if batch % self.parts:
            raise RuntimeError(f"guidance split needs an even batch, got {batch}")
        half = batch // self.parts
        mine = slice(self.part * half, (self.part + 1) * half)
        cond = kwargs["cond"] if "cond" in kwargs else args[2]
        state.context_tokens = call.family.attention_text_tokens(
            call.model.config, int(cond.embeds.shape[1]))
        sizes = (rows,) if state.warm else tuple(band_sizes(rows, self.patches, self.unit))
        outs = []
        for index in range(len(sizes)):
            state.plan = BandPlan(sizes, index)
            patch_args, patch_kwargs = split_call(args, kwargs, mine,
                                                  slice(state.plan.start, state.plan.stop))
            try:
                outs.append(self.original(*patch_args, **patch_kwargs))
            except StageDone:  # not the last stage: the patch went on to the next
                pass
        state.end_step()
        return self._share(outs, latents)

    def _share(self, outs: list[torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """The last stage's prediction, on every stage."""
        state = self.state
        if state.last:
            out = torch.cat(outs, dim=-2).to(latents.dtype)
            if self.parts > 1:
                out = torch.cat(self.cfg_comm.all_gather(out), dim=0)
        else:
            out = torch.empty_like(latents)
        return state.comm.broadcast(out.contiguous(), state.stages - 1)
