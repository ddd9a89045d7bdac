"""Image inputs (img2img, inpaint): read from the run's `image` (and `mask`) paths, one per
prompt or one for all, checked before launch; encoded with the VAE into the latent space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

from paraflow.errors import ParaflowError
from paraflow.graph import StageEnv
from paraflow.plugin import banded_vae
from paraflow.stages.decode import in_bands
from paraflow.stages.latents import draw, image_generators
from paraflow.vae import latent_downsampling, vae_output_to_latents
from paraflow.validate import prompts_of


def input_paths(cfg: DictConfig, key: str) -> list[str]:
    """The run's `key` (image or mask) as one path per prompt (a single path serves all)."""
    value = cfg.get(key)
    paths = [value] if isinstance(value, str) else list(value or [])
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ParaflowError(f"{key}={value!r}: pipeline={cfg.pipeline.name} needs {key}=PATH "
                            f"(or a list of paths, one per prompt)")
    prompts = len(prompts_of(cfg))
    if len(paths) not in (1, prompts):
        raise ParaflowError(f"{key}: {len(paths)} paths for {prompts} prompts; give one path, "
                            f"or one per prompt")
    return paths


def open_image(path: str, key: str) -> Image.Image:
    """The image at `path`, fully read (so a truncated file fails here, naming it)."""
    if not Path(path).expanduser().is_file():
        raise ParaflowError(f"{key}={path}: no such file")
    try:
        with Image.open(Path(path).expanduser()) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ParaflowError(f"{key}={path}: not a readable image ({error})") from None


def check_inputs(cfg: DictConfig, key: str) -> list[tuple[int, int]]:
    """Pre-launch: every path of `key` names a readable image; their (width, height)."""
    return [open_image(p, key).size for p in input_paths(cfg, key)]


def path_of(cfg: DictConfig, key: str, image_id: int) -> str:
    """The `key` path of output image `image_id` (images_per_prompt images per prompt)."""
    paths = input_paths(cfg, key)
    return paths[0] if len(paths) == 1 else paths[image_id // int(cfg.images_per_prompt)]


def load_inputs(env: StageEnv, key: str, image_ids: list[int],
                processor: VaeImageProcessor) -> torch.Tensor:
    """The `key` images of `image_ids`, prepared by `processor` at the run's size."""
    cfg = env.cfg
    images = [open_image(path_of(cfg, key, i), key) for i in image_ids]
    pixels = processor.preprocess(images, height=int(cfg.height), width=int(cfg.width))
    return pixels.to(env.device)


class LoadImage:
    """image_ids → the input images as (B, 3, height, width) in [-1, 1], resized to the run's
    size where they differ (VaeImageProcessor, as diffusers' pipelines prepare them)."""

    components = ()
    run_keys = ("image",)

    @staticmethod
    def check(cfg: DictConfig, spec: Any) -> None:
        check_inputs(cfg, "image")

    def __call__(self, env: StageEnv, image_ids: list[int]) -> dict[str, Any]:
        processor = VaeImageProcessor(vae_scale_factor=latent_downsampling(env.pipe),
                                      do_convert_rgb=True)
        return {"image": load_inputs(env, "image", image_ids, processor)}


class LoadMask:
    """image_ids → the masks as (B, 1, height, width), 1 where the image is repainted (grey
    levels binarized at one half, as diffusers' mask processor does)."""

    components = ()
    run_keys = ("mask",)

    @staticmethod
    def check(cfg: DictConfig, spec: Any) -> None:
        images, masks = check_inputs(cfg, "image"), check_inputs(cfg, "mask")
        paths = input_paths(cfg, "mask")
        for i, mask in enumerate(masks):
            image = images[0] if len(images) == 1 else images[i]
            if mask != image:
                raise ParaflowError(f"mask={paths[i]}: {mask[0]}x{mask[1]}, but its image is "
                                    f"{image[0]}x{image[1]}; give a mask of the image's size")

    def __call__(self, env: StageEnv, image_ids: list[int]) -> dict[str, Any]:
        processor = VaeImageProcessor(vae_scale_factor=latent_downsampling(env.pipe),
                                      do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)
        return {"mask": load_inputs(env, "mask", image_ids, processor)}


class EncodeImage:
    """Pixels → latents with the VAE encoder, a sample of its posterior drawn from each image's
    generator; the generators go on to draw the noise (diffusers' order of draws)."""

    components = ("vae",)
    compiles = True  # pipeline.stages.NAME.compile (paraflow/compile.py)

    def __call__(self, env: StageEnv, image: torch.Tensor,
                 image_ids: list[int]) -> dict[str, Any]:
        generators = image_generators(env, image_ids)
        return {"image_latents": encode_sample(env, image, generators), "generators": generators}


def encode_sample(env: StageEnv, pixels: torch.Tensor,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """The VAE's latents of `pixels` (fp32): a sample of its posterior, image i's drawn from
    generators[i] (diffusers' retrieve_latents); in bands where the running stage says so
    (`parallel`, as the decode stage reads it)."""
    vae = env.pipe.vae
    pixels = pixels.to(env.device, env.dtype)
    banded = banded_vae(env.strategy)
    if banded is not None and in_bands(env):  # the same posterior, each rank encoding a band
        posterior = DiagonalGaussianDistribution(banded.encode_in_bands(vae, pixels, env.ctx))
    else:  # one image at a time, as diffusers encodes with a generator per image
        parameters = torch.cat([vae.encode(pixels[i:i + 1]).latent_dist.parameters
                                for i in range(pixels.shape[0])])
        posterior = DiagonalGaussianDistribution(parameters)
    unit = draw(generators, tuple(posterior.mean.shape[1:]), env.device)
    sample = posterior.mean + posterior.std * unit.to(posterior.mean.dtype)
    # The encoder's output can be channels-last; diffusers' pipelines make it contiguous on the
    # way (a `repeat`), and the denoiser's kernels (so its last bits) depend on the layout.
    return vae_output_to_latents(vae, sample).float().contiguous()
