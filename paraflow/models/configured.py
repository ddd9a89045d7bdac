"""Model facts read from a model config, no weights loaded: the denoiser's config and family,
its downsampling, the VAE's. What pre-launch checks, the planner and the mesh read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from paraflow.families.base import Family
from paraflow.families.registry import family_of_class_name
from paraflow.models.pretrained import inspect_folder, looks_like_hub_id
from paraflow.vae import downsampling


def configured_denoiser(model_cfg: Any) -> Any:
    """The denoiser's config: a built-from-config model's `unet`/`transformer`, or a folder's
    unet/ or transformer/config.json; None if neither."""
    for name in ("unet", "transformer"):
        if name in model_cfg:
            return model_cfg[name]
        path = Path(str(model_cfg.get("path", ""))).expanduser() / name / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def configured_class_name(model_cfg: Any) -> str | None:
    """The denoiser's class: a folder's `_class_name`, else what the model's builder makes."""
    denoiser = configured_denoiser(model_cfg)
    if denoiser is None:
        return None
    if "_class_name" in denoiser:
        return str(denoiser["_class_name"])
    if "unet" in model_cfg:
        from paraflow.models.tiny import DENOISER

        return DENOISER.__name__
    from paraflow.models.tiny_dit import TRANSFORMERS

    arch = model_cfg.arch
    return TRANSFORMERS[str(getattr(arch, "value", arch))].__name__


def configured_family(model_cfg: Any) -> Family | None:
    """The family of the denoiser a model config builds or loads (None: only a download would
    tell)."""
    name = configured_class_name(model_cfg)
    return None if name is None else family_of_class_name(name)


def configured_downsampling(model_cfg: Any) -> int | None:
    """Latent rows per band unit of the denoiser (None if the config does not say)."""
    family = configured_family(model_cfg)
    return None if family is None else family.downsampling(configured_denoiser(model_cfg))


def configured_latent_downsampling(model_cfg: Any) -> int:
    """The VAE's downsampling: a built-from-config model's `vae`, a pipeline folder's
    vae/config.json (checking the folder, naming what is missing), or 8 for a hub id (every hub
    SD/SDXL VAE; checked again once loaded)."""
    if "vae" in model_cfg:
        return downsampling(model_cfg.vae.block_out_channels)
    path = str(model_cfg.path)
    if looks_like_hub_id(path):
        return 8
    _, vae_config = inspect_folder(path)
    return downsampling(vae_config.get("block_out_channels", [0] * 4))
