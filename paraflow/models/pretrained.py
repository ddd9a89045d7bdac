"""Diffusers Stable Diffusion 1.x/2.x, SDXL, PixArt-α/Σ, SD3/3.5 and Flux pipeline folders (as
`save_pretrained` writes them, safetensors weights), or hub ids when the hub is reachable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from paraflow.errors import ParaflowError

SUPPORTED = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLImg2ImgPipeline,  # the SDXL refiner
    "PixArtAlphaPipeline": PixArtAlphaPipeline,
    "PixArtSigmaPipeline": PixArtSigmaPipeline,
    "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
    "FluxPipeline": FluxPipeline,
}
PIXART_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
REQUIRED = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                  "tokenizer_2", "scheduler"),
    "StableDiffusionXLImg2ImgPipeline": ("unet", "vae", "text_encoder_2", "tokenizer_2",
                                         "scheduler"),
    "PixArtAlphaPipeline": PIXART_PARTS,
    "PixArtSigmaPipeline": PIXART_PARTS,
    "StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "text_encoder_2",
                                 "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
                                 "scheduler"),
    "FluxPipeline": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                     "tokenizer_2", "scheduler"),
}


def looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


def inspect_folder(path: str) -> tuple[str, dict[str, Any]]:
    """Check a local pipeline folder before anything loads; return its class and VAE config."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ParaflowError(f"model.path={path}: no such folder. Give a diffusers pipeline folder "
                            "(with model_index.json, as save_pretrained writes it) or a hub id")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ParaflowError(f"model.path={path}: model_index.json is missing, so this is not a "
                            "diffusers pipeline folder")
    class_name = json.loads(index_file.read_text()).get("_class_name", "?")
    if class_name not in SUPPORTED:
        raise ParaflowError(f"model.path={path}: pipeline class {class_name} is not supported; "
                            f"supported: {', '.join(SUPPORTED)}")
    missing = [part for part in REQUIRED[class_name] if not (folder / part).is_dir()]
    if missing:
        raise ParaflowError(f"model.path={path}: incomplete {class_name} folder, missing "
                            f"{', '.join(missing)}")
    vae_config = folder / "vae" / "config.json"
    if not vae_config.is_file():
        raise ParaflowError(f"model.path={path}: vae/config.json is missing")
    return class_name, json.loads(vae_config.read_text())


def _without_safety_checker(class_name: str) -> dict[str, Any]:
    """SD 1.x/2.x folders name a safety checker and its feature extractor; paraflow loads
    neither (locally or from the hub): generation only, as every other pipeline here."""
    if class_name != "StableDiffusionPipeline":
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _hub_class(path: str, local_files_only: bool) -> str:
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ParaflowError(f"model.path={path}: could not load from the hub or its cache "
                            f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from None
    class_name = str(index.get("_class_name", "?"))
    if class_name not in SUPPORTED:
        raise ParaflowError(f"model.path={path}: pipeline class {class_name} is not supported; "
                            f"supported: {', '.join(SUPPORTED)}")
    return class_name


def load_pretrained(path: str, variant: str | None = None, local_files_only: bool = True) -> Any:
    """A local pipeline folder, or a hub id (from the local cache unless local_files_only is
    false). Loaded with low memory use (accelerate) and without the safety checker."""
    if looks_like_hub_id(path):
        class_name = _hub_class(path, local_files_only)
        try:
            return SUPPORTED[class_name].from_pretrained(
                path, variant=variant, use_safetensors=True, local_files_only=local_files_only,
                low_cpu_mem_usage=True, **_without_safety_checker(class_name))
        except (OSError, ValueError) as err:
            raise ParaflowError(f"model.path={path}: could not load from the hub or its cache "
                                f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from None
    class_name, _ = inspect_folder(path)
    return SUPPORTED[class_name].from_pretrained(path, variant=variant, use_safetensors=True,
                                                 low_cpu_mem_usage=True,
                                                 **_without_safety_checker(class_name))
