"""Patch-parallel VAE decode: each rank decodes its band of latent rows, its convolutions take
halo rows from the neighbouring bands and its GroupNorms (and the mid-block attention) see the
whole image, so the pixels equal the single-device decode while each rank holds only its band's
activations.

Split: latent rows (and the pixel rows they decode to). Communicated: conv halo rows, GroupNorm
sums, the mid-block attention's keys/values, and one all-gather of the pixel bands at the end.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from paraflow.adapters import vae_decoder
from paraflow.comm import Communicator
from paraflow.strategies.patch.bands import BandPlan, band_sizes
from paraflow.strategies.patch.conv import PatchConv2d
from paraflow.strategies.patch.layers import swap_patch_layers
from paraflow.strategies.patch.state import PatchState


def _decoder_state(vae: Any, comm: Communicator) -> PatchState:
    """The patch state of `vae`'s decoder, swapping its layers the first time."""
    decoder = vae_decoder(vae)
    for module in decoder.modules():
        if isinstance(module, PatchConv2d):
            return module.state
    state = PatchState(comm)
    swap_patch_layers(decoder, state, prefix="vae.decoder.")
    return state


def patch_decode(vae: Any, latents: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """`vae.decode(latents)` with the rows of the image split over the ranks of `comm`; every
    rank returns the whole image."""
    state = _decoder_state(vae, comm)
    plan = BandPlan(tuple(band_sizes(latents.shape[-2], comm.world_size)), comm.rank)
    state.plan = plan
    band = vae.decode(latents[..., plan.start:plan.stop, :], return_dict=False)[0]
    scale = band.shape[-2] // plan.sizes[plan.index]
    tallest = max(plan.sizes) * scale
    pieces = comm.all_gather(F.pad(band, (0, 0, 0, tallest - band.shape[-2])))
    return torch.cat([p[..., : n * scale, :] for p, n in zip(pieces, plan.sizes)], dim=-2)
