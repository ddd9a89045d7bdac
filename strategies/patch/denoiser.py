"""The denoiser (UNet or transformer) of a patch-parallel run: each rank runs it on its band of
rows (and, with the guidance split, its half of the batch); the output bands are all-gathered so
every rank holds the whole noise prediction, and the scheduler steps the whole latent.

Split: latent rows (bands; a family that packs tokens, as Flux does, packs the band's rows inside
its call) and optionally the guidance batch. Communicated at the denoiser's output: one
all-gather of every rank's output band over all ranks (padded to the tallest band). Implemented
with forward hooks on the denoiser's call (paraflow.families.DenoiserCall), whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paraflow.comm import Communicator
from paraflow.families.call import call_latents, split_call
from paraflow.strategies.patch.bands import BandPlan, band_sizes
from paraflow.strategies.patch.state import PatchState


@dataclass
class BandLayout:
    """Where each rank sits: the batch is cut into len(groups) equal parts (1, or 2 with the
    guidance split), part g denoised by the world ranks `groups[g]`, one band each."""

    world: Communicator
    groups: list[list[int]]
    unit: int  # bands are whole multiples of this many latent rows

    def position(self, rank: int) -> tuple[int, int, int]:
        """(batch part, band index, bands in that part) of world rank `rank`."""
        for part, members in enumerate(self.groups):
            if rank in members:
                return part, members.index(rank), len(members)
        raise ValueError(f"rank {rank} is in no group of {self.groups}")

    def plan(self, rank: int, rows: int) -> BandPlan:
        _, band, bands = self.position(rank)
        return BandPlan(tuple(band_sizes(rows, bands, self.unit)), band)


class PatchDenoiserHooks:
    """Forward pre-hook: slice the call to this rank's batch half and band. Forward hook: flush
    the displaced buckets, all-gather the output bands, rebuild the whole prediction."""

    def __init__(self, state: PatchState, layout: BandLayout) -> None:
        self.state, self.layout = state, layout
        self._full: torch.Tensor | None = None

    def install(self, call: nn.Module) -> list[Any]:
        return [call.register_forward_pre_hook(self.before, with_kwargs=True),
                call.register_forward_hook(self.after)]

    def before(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        layout = self.layout
        part = layout.position(layout.world.rank)[0]
        latents = call_latents(args, kwargs)
        batch = latents.shape[0]
        if batch % len(layout.groups):
            raise RuntimeError(f"guidance split needs an even batch, got {batch}")
        half = batch // len(layout.groups)
        plan = layout.plan(layout.world.rank, latents.shape[-2])
        self.state.plan = plan
        cond = kwargs["cond"] if "cond" in kwargs else args[2]
        call: Any = module  # the DenoiserCall the hooks are installed on
        self.state.context_tokens = call.family.attention_text_tokens(
            call.model.config, int(cond.embeds.shape[1]))
        rows = slice(part * half, (part + 1) * half)
        self._full = latents
        self.state.whole_input = latents[rows]  # for conv_in (replicated_input_convs)
        return split_call(args, kwargs, rows, slice(plan.start, plan.stop))

    def after(self, module: nn.Module, args: tuple[Any, ...], local: torch.Tensor) -> Any:
        self.state.flush()
        self.state.whole_input = None
        full, layout = self._full, self.layout
        if full is None:
            raise RuntimeError("patch denoiser output hook ran without its input hook")
        rows = full.shape[-2]
        plans = [layout.plan(rank, rows) for rank in range(layout.world.world_size)]
        tallest = max(max(p.sizes) for p in plans)
        piece = F.pad(local, (0, 0, 0, tallest - local.shape[-2]))
        pieces = layout.world.all_gather(piece)
        out = local.new_empty((full.shape[0], *local.shape[1:-2], rows, local.shape[-1]))
        half = local.shape[0]
        for rank, (gathered, plan) in enumerate(zip(pieces, plans)):
            part = layout.position(rank)[0]
            out[part * half:(part + 1) * half, ..., plan.start:plan.stop, :] = \
                gathered[..., : plan.stop - plan.start, :]
        self._full = None
        return out
