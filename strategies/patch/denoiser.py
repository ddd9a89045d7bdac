"""The denoiser (UNet or transformer) of a patch-parallel run: each rank runs it on its band of
rows (and, with the guidance split, its half of the batch); the output bands are all-gathered so
every rank holds the whole noise prediction, and the scheduler steps the whole latent.

Split: latent rows (bands; Flux's packed tokens by whole token rows) and optionally the guidance
batch. Communicated at the denoiser's output: one all-gather of every rank's output band over all
ranks (padded to the tallest band). Implemented with forward hooks on the unchanged module.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paraflow.adapters import (
    call_rows,
    call_sample,
    denoiser_output_sample,
    split_denoiser_call,
    with_output_sample,
)
from paraflow.comm import Communicator
from paraflow.strategies.patch.bands import BandPlan, band_sizes
from paraflow.strategies.patch.state import PatchState


@dataclass
class Layout:
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

    def __init__(self, state: PatchState, layout: Layout) -> None:
        self.state, self.layout = state, layout
        self._full: torch.Tensor | None = None
        self._per_row = Fraction(1)  # entries of the sample's dim −2 per latent row (Flux: tokens)

    def install(self, unet: nn.Module) -> list[Any]:
        return [unet.register_forward_pre_hook(self.before, with_kwargs=True),
                unet.register_forward_hook(self.after, with_kwargs=True)]

    def before(self, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        layout = self.layout
        part = layout.position(layout.world.rank)[0]
        sample = call_sample(args, kwargs)
        batch = sample.shape[0]
        if batch % len(layout.groups):
            raise RuntimeError(f"guidance split needs an even batch, got {batch}")
        half = batch // len(layout.groups)
        latent_rows, self._per_row = call_rows(args, kwargs)
        plan = layout.plan(layout.world.rank, latent_rows)
        self.state.plan = plan
        context = kwargs.get("encoder_hidden_states")
        self.state.context_tokens = 0 if context is None else int(context.shape[1])
        rows = slice(part * half, (part + 1) * half)
        new_args, new_kwargs, self._full = split_denoiser_call(
            args, kwargs, rows, slice(plan.start, plan.stop))
        self.state.whole_input = self._full[rows]  # for conv_in (replicated_input_convs)
        return new_args, new_kwargs

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              output: Any) -> Any:
        self.state.flush()
        self.state.whole_input = None
        full, layout = self._full, self.layout
        if full is None:
            raise RuntimeError("patch UNet output hook ran without its input hook")
        local = denoiser_output_sample(output)
        per_row = self._per_row  # bands lie along dim −2: latent rows, or Flux's tokens
        rows = int(full.shape[-2] / per_row)
        plans = [layout.plan(rank, rows) for rank in range(layout.world.world_size)]
        tallest = int(max(max(p.sizes) for p in plans) * per_row)
        piece = F.pad(local, (0, 0, 0, tallest - local.shape[-2]))
        pieces = layout.world.all_gather(piece)
        out = local.new_empty((full.shape[0], *local.shape[1:-2], full.shape[-2],
                               local.shape[-1]))
        half = local.shape[0]
        for rank, (gathered, plan) in enumerate(zip(pieces, plans)):
            part = layout.position(rank)[0]
            start, stop = int(plan.start * per_row), int(plan.stop * per_row)
            out[part * half:(part + 1) * half, ..., start:stop, :] = \
                gathered[..., : stop - start, :]
        self._full = None
        return with_output_sample(output, out)
