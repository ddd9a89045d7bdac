"""The denoiser call every family answers the same way: latent images (B, C, H, W) in, the
prediction (B, C, H, W) out. Strategies hook this module (a forward pre-hook cuts the batch or a
band of latent rows, a forward hook gathers), so they never see a family's own inputs: Flux's
packed tokens and image ids are made inside, for the rows the call was given (`first_row`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paraflow.families.base import Conditioning, Family
from paraflow.families.registry import family_of
from paraflow.vae import latent_downsampling

_CALL = "_paraflow_denoiser_call"  # where a denoiser keeps its one call module


def denoiser(pipe_or_model: Any) -> nn.Module:
    """The pipeline's denoising network (its UNet or transformer), or the module itself."""
    for name in ("unet", "transformer"):
        found = getattr(pipe_or_model, name, None)
        if isinstance(found, nn.Module):
            return found
    if not isinstance(pipe_or_model, nn.Module):
        raise TypeError(f"{type(pipe_or_model).__name__} has no unet or transformer")
    return pipe_or_model


class DenoiserCall(nn.Module):
    """`forward(latents, timestep, cond, first_row=0)`: the family's call of `model`. The model
    is held as a plain attribute, not a submodule, so state dicts and module walks see it
    once, where the pipeline holds it."""

    model: Any  # the denoiser (its `config` is what the family's methods read)

    def __init__(self, model: nn.Module, family: Family) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        self.family = family

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                first_row: int = 0) -> torch.Tensor:
        return self.family.forward(self.model, latents, timestep, cond, first_row)


def denoiser_call(pipe_or_model: Any) -> DenoiserCall:
    """The denoiser's call module, made once (hooks installed on it stay with it)."""
    model = denoiser(pipe_or_model)
    call = model.__dict__.get(_CALL)
    if call is None:
        call = DenoiserCall(model, family_of(model))
        object.__setattr__(model, _CALL, call)
    return call  # type: ignore[no-any-return]


def split_call(args: tuple[Any, ...], kwargs: dict[str, Any], batch_rows: slice,
               band_rows: slice | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A DenoiserCall's arguments for the images `batch_rows` and (optionally) the latent rows
    `band_rows`, as keyword arguments."""
    names = ("latents", "timestep", "cond", "first_row")
    given = {**dict(zip(names, args)), **kwargs}
    latents: torch.Tensor = given["latents"]
    batch = latents.shape[0]
    timestep: torch.Tensor = given["timestep"]
    if timestep.dim() >= 1 and timestep.shape[0] == batch:
        timestep = timestep[batch_rows]
    picked = latents[batch_rows]
    first = int(given.get("first_row", 0))
    if band_rows is not None:
        start, stop, _ = band_rows.indices(latents.shape[-2])
        picked, first = picked[..., start:stop, :], first + start
    return (), {"latents": picked, "timestep": timestep,
                "cond": given["cond"].select(batch_rows, batch), "first_row": first}


def call_latents(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A DenoiserCall's latent images."""
    return args[0] if args else kwargs["latents"]  # type: ignore[no-any-return]


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, int, int]:
    """(channels, rows, columns) of one image's latents in `pipe`'s latent space."""
    model: Any = denoiser(pipe)
    channels = family_of(model).latent_channels(model.config)
    factor = latent_downsampling(pipe)
    return channels, height // factor, width // factor
