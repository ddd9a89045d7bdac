"""The VAE's side of the latent space, the same for every family: its downsampling and the
normalisation its latents were trained with (a scaling factor and shift, or per-channel mean and
std)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _vae(pipe_or_vae: Any) -> Any:
    return getattr(pipe_or_vae, "vae", pipe_or_vae)


def downsampling(block_out_channels: Sequence[int]) -> int:
    """2 per down block but the last, in diffusers' VAEs (and UNets)."""
    return int(2 ** (len(block_out_channels) - 1))


def latent_downsampling(pipe_or_vae: Any) -> int:
    """Pixels per latent row (and column): the VAE's downsampling."""
    return downsampling(_vae(pipe_or_vae).config.block_out_channels)


def vae_decoder(pipe_or_vae: Any) -> nn.Module:
    """The module `vae.decode` runs after the latent projection (where patch layers go)."""
    decoder: nn.Module = _vae(pipe_or_vae).decoder
    return decoder


def _latent_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel mean and std the VAE's latents were normalised with, shaped to broadcast
    over `like`; None for a VAE with one scaling factor (and a shift)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, like.shape[1], 1, 1)
    return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
            torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))


def latents_to_vae_input(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent normalisation the VAE was trained with (mean/std where given)."""
    scale, statistics = vae.config.scaling_factor, _latent_statistics(vae, latents)
    if statistics is not None:
        mean, std = statistics
        return latents * std / scale + mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's and Flux's VAEs
    return latents / scale + shift


def vae_output_to_latents(vae: Any, sample: torch.Tensor) -> torch.Tensor:
    """A VAE encoder's sample in the denoiser's latent space (latents_to_vae_input's inverse)."""
    scale, statistics = vae.config.scaling_factor, _latent_statistics(vae, sample)
    if statistics is not None:
        mean, std = statistics
        return (sample - mean) * scale / std
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * scale
