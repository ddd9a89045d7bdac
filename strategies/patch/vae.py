"""Patch-parallel VAE decode and encode: each rank decodes its band of latent rows (encodes its
band of pixel rows, a whole number of latent rows), its convolutions take halo rows from the
neighbouring bands and its GroupNorms (and the mid-block attention) see the whole image, so the
result equals the single-device one while each rank holds only its band's activations.

Split: latent rows (and the pixel rows they decode from or to). Communicated: conv halo rows,
GroupNorm sums, the mid-block attention's keys/values, and one all-gather of the bands at the
end. The encoder's downsamplers pad one zero row below the image before a stride-2 convolution:
a band takes that row from the band below instead (PatchDownsample).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from torch import nn

from paraflow.comm import Communicator
from paraflow.strategies.patch.bands import BandPlan, band_sizes
from paraflow.strategies.patch.conv import PatchConv2d
from paraflow.strategies.patch.layers import swap_patch_layers
from paraflow.strategies.patch.state import PatchState
from paraflow.vae import latent_downsampling, vae_decoder


class PatchDownsample(nn.Module):
    """Downsample2D's pad-then-convolve (one zero row and column after the image, a stride-2
    3×3 convolution without padding) on a band: the row after the band is the first row of the
    band below (zero after the last band). `inner` keeps its convolution (already a
    PatchConv2d, whose own convolution this calls directly)."""

    def __init__(self, inner: Downsample2D, state: PatchState, key: str) -> None:
        super().__init__()
        self.inner, self.state, self.key = inner, state, key

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        band = self.state.band
        pieces = self.state.gather(self.key, x[..., :1, :])  # every band's first row
        last = band.index == len(band.sizes) - 1
        below = torch.zeros_like(pieces[0]) if last else pieces[band.index + 1]
        padded = F.pad(torch.cat([x, below], dim=-2), (0, 1, 0, 0))
        conv = self.inner.conv
        return conv.conv(padded) if isinstance(conv, PatchConv2d) else conv(padded)


def _swap_downsamplers(encoder: nn.Module, state: PatchState, prefix: str) -> None:
    for name, module in list(encoder.named_modules()):
        if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            setattr(parent, child, PatchDownsample(module, state, prefix + name))


def _coder_state(coder: nn.Module, comm: Communicator, prefix: str) -> PatchState:
    """The patch state of a VAE's decoder or encoder, swapping its layers the first time."""
    for module in coder.modules():
        if isinstance(module, PatchConv2d):
            return module.state
    state = PatchState(comm)
    swap_patch_layers(coder, state, prefix=prefix)
    _swap_downsamplers(coder, state, prefix)
    return state


def _decoder_state(vae: Any, comm: Communicator) -> PatchState:
    return _coder_state(vae_decoder(vae), comm, "vae.decoder.")


def _gather_bands(band: torch.Tensor, plan: BandPlan, scale: int,
                  comm: Communicator) -> torch.Tensor:
    """Every rank's band (each `scale` × its plan rows tall) in order, on every rank."""
    tallest = max(plan.sizes) * scale
    pieces = comm.all_gather(F.pad(band, (0, 0, 0, tallest - band.shape[-2])))
    return torch.cat([p[..., : n * scale, :] for p, n in zip(pieces, plan.sizes)], dim=-2)


def patch_encode(vae: Any, pixels: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """The parameters (mean and log-variance, stacked on channels) of `vae.encode(pixels)`'s
    posterior, with the rows of the image split over the ranks of `comm` in whole latent rows;
    every rank returns the whole latent."""
    state = _coder_state(vae.encoder, comm, "vae.encoder.")
    factor = latent_downsampling(vae)
    latent_rows = band_sizes(pixels.shape[-2] // factor, comm.world_size)
    plan = BandPlan(tuple(n * factor for n in latent_rows), comm.rank)
    state.plan = plan
    moments = vae.encode(pixels[..., plan.start:plan.stop, :]).latent_dist.parameters
    return _gather_bands(moments, BandPlan(tuple(latent_rows), comm.rank), 1, comm)


def patch_decode(vae: Any, latents: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """`vae.decode(latents)` with the rows of the image split over the ranks of `comm`; every
    rank returns the whole image."""
    state = _decoder_state(vae, comm)
    plan = BandPlan(tuple(band_sizes(latents.shape[-2], comm.world_size)), comm.rank)
    state.plan = plan
    band = vae.decode(latents[..., plan.start:plan.stop, :], return_dict=False)[0]
    return _gather_bands(band, plan, band.shape[-2] // plan.sizes[plan.index], comm)
