"""The one place that knows diffusers' internal names, for SD 1.x/2.x and SDXL pipelines (a UNet
denoiser) and the diffusion transformers PixArt-α/Σ, SD3/3.5 (MMDiT) and Flux (MMDiT with
single-stream blocks, rotary positions and latents packed in 2×2 patches).

Model facts, from loaded (or meta) modules or from a model config without weights: the VAE's and
the denoiser's downsampling, latent channels, text-embedding width, SDXL's added-conditioning
widths, attention heads, which modules are self-attention. The run: prompt encoding,
micro-conditioning, a denoiser call's arguments and output, latent scaling, image
post-processing."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from diffusers.models.transformers.transformer_flux import FluxAttention
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn
from transformers import CLIPTextModel

from paraflow.models.pretrained import inspect_folder, looks_like_hub_id

TIME_IDS = 6  # SDXL micro-conditioning: original size, crop offset, target size (2 each)
FLUX_PACK = 2  # Flux packs 2×2 latent pixels into one token
# Every pipeline's text encoders by component name (SDXL's second CLIP, SD3's CLIPs and T5, Flux's
# CLIP and T5): what the encode stage places and what prompt embeddings depend on.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# The token rows of the Flux call under way (set by denoiser_forward, read by call_rows).
_FLUX_TOKEN_ROWS: ContextVar[int | None] = ContextVar("flux_token_rows", default=None)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, batch ordered [unconditional..., conditional...]
    when guidance is on (as diffusers orders it)."""

    embeds: torch.Tensor
    # Per-image extras: SDXL's pooled text embeds and time ids; PixArt's text attention mask
    # (and PixArt-α's resolution and aspect ratio).
    added: dict[str, torch.Tensor] | None

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        added = {k: v.to(device=device, dtype=dtype) for k, v in (self.added or {}).items()}
        return Conditioning(self.embeds.to(device=device, dtype=dtype), added or None)


def is_sdxl(pipe: Any) -> bool:
    """SDXL's base, or its refiner (an img2img pipeline class)."""
    return isinstance(pipe, (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline))


def is_pixart(pipe: Any) -> bool:
    return isinstance(pipe, (PixArtAlphaPipeline, PixArtSigmaPipeline))


def is_sd3(pipe: Any) -> bool:
    return isinstance(pipe, StableDiffusion3Pipeline)


def is_flux(pipe: Any) -> bool:
    return isinstance(pipe, FluxPipeline)


def denoiser(pipe: Any) -> nn.Module:
    """The pipeline's denoising network: its UNet or its transformer."""
    found: nn.Module = _unet(pipe)
    return found


def is_transformer(pipe_or_model: Any) -> bool:
    """A diffusion transformer (patchified tokens) rather than a UNet."""
    return "patch_size" in _unet(pipe_or_model).config


def _packs_latents(config: Any) -> bool:
    """Flux: the transformer reads 2×2 latent patches packed into tokens, placed by rotary ids."""
    return "axes_dims_rope" in config


def denoiser_family(config: Any) -> str:
    """The family a denoiser config belongs to, as per-family data (strategy=tensor's plans) is
    keyed: unet, pixart, sd3, flux, or transformer (another diffusion transformer)."""
    if _packs_latents(config):
        return "flux"
    if "pos_embed_max_size" in config and "joint_attention_dim" in config:
        return "sd3"
    if "caption_channels" in config:
        return "pixart"
    return "transformer" if "patch_size" in config else "unet"


def guidance_distilled(config: Any) -> bool:
    """A denoiser config that takes no classifier-free guidance: Flux (guidance, if any, is an
    embedded input; FluxPipeline's separate `true_cfg_scale` passes are not run) or an LCM-style
    UNet with a guidance embedding."""
    return _packs_latents(config) or config.get("time_cond_proj_dim") is not None


def alias_flattened_clip(pipe: Any) -> Any:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model` inside), which diffusers'
    SD pipelines still read for clip_skip's final layer norm (diffusers#14124): point the old
    name at the model itself. A plain attribute, not a submodule, so weights, state dicts and
    `.to()` are untouched."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, CLIPTextModel) and not hasattr(encoder, "text_model"):
            object.__setattr__(encoder, "text_model", encoder)
    return pipe


# --- model facts -------------------------------------------------------------------------------
# `pipe_or_*`: a pipeline (anything with .unet / .vae) or the module itself, loaded or on meta.

def _unet(pipe_or_unet: Any) -> Any:
    """The denoiser of a pipeline, or the module itself (a UNet or a transformer)."""
    if getattr(pipe_or_unet, "unet", None) is not None:
        return pipe_or_unet.unet
    return getattr(pipe_or_unet, "transformer", None) or pipe_or_unet


def _vae(pipe_or_vae: Any) -> Any:
    return getattr(pipe_or_vae, "vae", pipe_or_vae)


def _downsampling(block_out_channels: Sequence[int]) -> int:
    """2 per down block but the last, in diffusers' VAEs and UNets alike."""
    return int(2 ** (len(block_out_channels) - 1))


def latent_downsampling(pipe_or_vae: Any) -> int:
    """Pixels per latent row (and column): the VAE's downsampling."""
    return _downsampling(_vae(pipe_or_vae).config.block_out_channels)


def _denoiser_downsampling(config: Any) -> int:
    if "patch_size" in config:  # a transformer: one token row is patch_size latent rows
        return int(config["patch_size"]) * (FLUX_PACK if _packs_latents(config) else 1)
    return _downsampling(config["block_out_channels"])


def denoiser_downsampling(pipe_or_unet: Any) -> int:
    """Latent rows per row at the denoiser's coarsest level (a UNet's deepest block, a
    transformer's token rows): bands are whole multiples of it."""
    return _denoiser_downsampling(_unet(pipe_or_unet).config)


def configured_latent_downsampling(model_cfg: Any) -> int:
    """latent_downsampling from a model config, no weights loaded: a built-from-config model's
    `vae`, a pipeline folder's vae/config.json (checking the folder, naming what is missing), or
    8 for a hub id (every hub SD/SDXL VAE; checked again once loaded)."""
    if "vae" in model_cfg:
        return _downsampling(model_cfg.vae.block_out_channels)
    path = str(model_cfg.path)
    if looks_like_hub_id(path):
        return 8
    _, vae_config = inspect_folder(path)
    return _downsampling(vae_config.get("block_out_channels", [0] * 4))


def configured_downsampling(model_cfg: Any) -> int | None:
    """denoiser_downsampling from a model config (no weights), None if the config does not
    say."""
    config = configured_denoiser(model_cfg)
    return None if config is None else _denoiser_downsampling(config)


def configured_denoiser(model_cfg: Any) -> Any:
    """The denoiser's config from a model config, no weights: a built-from-config model's
    `unet`/`transformer`, or a folder's unet/ or transformer/config.json; None if neither."""
    for name in ("unet", "transformer"):
        if name in model_cfg:
            return model_cfg[name]
        path = Path(str(model_cfg.get("path", ""))).expanduser() / name / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def latent_channels(pipe_or_model: Any) -> int:
    """Channels of the latent: a VAE's latent channels, a UNet's output channels (an inpainting
    UNet reads more: the mask and the masked image's latents), a transformer's input channels
    (Flux's packed 2×2)."""
    config = _unet(pipe_or_model).config
    if "latent_channels" in config:
        return int(config.latent_channels)
    if "patch_size" not in config:
        return int(config.out_channels)
    packed = FLUX_PACK ** 2 if _packs_latents(config) else 1
    return int(config.in_channels) // packed


def context_width(pipe_or_unet: Any) -> int:
    """Width of the text embeddings the denoiser reads (a transformer projects them itself)."""
    config = _unet(pipe_or_unet).config
    return int(config.get("caption_channels") or config.get("joint_attention_dim")
               or config.cross_attention_dim)


def added_condition_widths(pipe_or_unet: Any) -> dict[str, int] | None:
    """SDXL's added conditioning, name → width per image (`added_cond_kwargs`); None for SD."""
    config = _unet(pipe_or_unet).config
    if config.get("addition_embed_type") != "text_time":
        return None
    time_width = TIME_IDS * int(config.addition_time_embed_dim)
    return {"text_embeds": int(config.projection_class_embeddings_input_dim) - time_width,
            "time_ids": TIME_IDS}


def inpainting_unet(pipe_or_unet: Any) -> bool:
    """A UNet made for inpainting: its input is the latents, the mask and the masked image's
    latents, concatenated (stable-diffusion-inpainting's 9 channels)."""
    config = _unet(pipe_or_unet).config
    return "patch_size" not in config and int(config.in_channels) > int(config.out_channels)


def conditioning_extras(pipe_or_model: Any, tokens: int) -> dict[str, tuple[int, ...]] | None:
    """Conditioning.added's entries, name → shape per image: SDXL's pooled embeds and time ids,
    PixArt's text mask over `tokens` (and PixArt-α's resolution and aspect ratio), SD3's and
    Flux's pooled text embeds (and Flux-dev's guidance)."""
    if not is_transformer(pipe_or_model):
        widths = added_condition_widths(pipe_or_model)
        return None if widths is None else {k: (w,) for k, w in widths.items()}
    config = _unet(pipe_or_model).config
    if "pooled_projection_dim" in config:
        pooled: dict[str, tuple[int, ...]] = {"pooled_projections": (config.pooled_projection_dim,)}
        return {**pooled, "guidance": ()} if config.get("guidance_embeds") else pooled
    extras: dict[str, tuple[int, ...]] = {"encoder_attention_mask": (tokens,)}
    if config.get("use_additional_conditions"):
        extras.update(resolution=(2,), aspect_ratio=(1,))
    return extras


def uses_guidance(pipe_or_unet: Any, guidance_scale: float) -> bool:
    """Classifier-free guidance runs when the scale exceeds 1 (and the denoiser is not
    guidance-distilled), as in diffusers."""
    return guidance_scale > 1.0 and not guidance_distilled(_unet(pipe_or_unet).config)


def with_embedded_guidance(model: Any, cond: Conditioning, guidance_scale: float,
                           batch: int) -> Conditioning:
    """Flux-dev's guidance scale as the transformer's `guidance` input, one per image (as
    FluxPipeline passes it); the conditioning unchanged for other models."""
    if not model.config.get("guidance_embeds"):
        return cond
    guidance = torch.full((batch,), guidance_scale, dtype=torch.float32, device=cond.embeds.device)
    return Conditioning(cond.embeds, {**(cond.added or {}), "guidance": guidance})


def set_timesteps(scheduler: Any, steps: int, device: torch.device, model: Any,
                  latent_shape: Sequence[int]) -> None:
    """The sampling schedule as each family's pipeline sets it: Flux's sigmas from 1 to 1/steps
    and, where the scheduler shifts by resolution, the shift for the image's token count."""
    config = model.config
    sigmas = None
    if _packs_latents(config) and not scheduler.config.get("use_flow_sigmas"):
        sigmas = np.linspace(1.0, 1 / steps, steps)
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting"):
        unit = _denoiser_downsampling(config)
        tokens = (latent_shape[-2] // unit) * (latent_shape[-1] // unit)
        kwargs["mu"] = calculate_shift(
            tokens, scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15 if _packs_latents(config) else 1.16))
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


def replicated_input_convs(unet: Any) -> set[str]:
    """The convolutions of `unet` whose input every rank holds whole: `conv_in` reads the
    latent itself (unless the UNet rescales it first), so its halo rows can be sliced from the
    current latent instead of exchanged or taken from the previous step."""
    conv_in = getattr(unet, "conv_in", None)
    if isinstance(conv_in, nn.Conv2d) and not unet.config.get("center_input_sample", False):
        return {"conv_in"}
    return set()


def patch_embedding(model: nn.Module) -> nn.Module | None:
    """A transformer's patch embedding (latent → tokens plus positions); None for a UNet."""
    embed = getattr(model, "pos_embed", None)
    return embed if isinstance(embed, PatchEmbed) else None


def band_patch_embed(embed: Any, band: torch.Tensor, rows: int, first_row: int) -> torch.Tensor:
    """What `PatchEmbed` gives for latent rows [first_row, first_row + band rows) of an image
    `rows` latent rows tall: the band's own projection (a patch reads only its own rows) plus
    the whole image's positional embedding at the band's token rows."""
    latent = embed.proj(band)
    if embed.flatten:
        latent = latent.flatten(2).transpose(1, 2)
    if embed.layer_norm:
        latent = embed.norm(latent)
    if embed.pos_embed is None:
        return latent
    size, width = embed.patch_size, band.shape[-1]
    grid = (rows // size, width // size)
    if embed.pos_embed_max_size:
        pos = embed.cropped_pos_embed(rows, width)
    elif (embed.height, embed.width) != grid:
        pos = get_2d_sincos_pos_embed(
            embed_dim=embed.pos_embed.shape[-1], grid_size=grid, base_size=embed.base_size,
            interpolation_scale=embed.interpolation_scale, device=latent.device,
            output_type="pt").float().unsqueeze(0)
    else:
        pos = embed.pos_embed
    start = first_row // size * grid[1]
    return (latent + pos[:, start:start + latent.shape[1]]).to(latent.dtype)


def vae_decoder(pipe_or_vae: Any) -> nn.Module:
    """The module `vae.decode` runs after the latent projection (where patch layers go)."""
    decoder: nn.Module = _vae(pipe_or_vae).decoder
    return decoder


# --- attention ---------------------------------------------------------------------------------

def is_self_attention(module: nn.Module) -> bool:
    """A diffusers attention module whose keys and values come from its own input."""
    return (hasattr(module, "set_processor") and hasattr(module, "to_k")
            and not getattr(module, "is_cross_attention", False))


def self_attention_modules(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(name, module) of every self-attention module of `model`, in module order."""
    return ((n, m) for n, m in model.named_modules() if is_self_attention(m))


def set_self_attention_processors(model: nn.Module, make: Callable[[str, Any], Any]) -> int:
    """Give every self-attention module of `model` the processor `make(name, module)`;
    cross-attention keeps its own. Returns how many were set."""
    found = list(self_attention_modules(model))
    for name, module in found:
        module.set_processor(make(name, module))
    return len(found)


def attention_kind(module: Any) -> str:
    """How a self-attention module mixes text in: "flux" (FluxAttention: text tokens first,
    rotary positions; without added projections, a single-stream block whose input leads with
    the text), "joint" (SD3's JointAttnProcessor2_0: image tokens, then text), or "plain"."""
    if isinstance(module, FluxAttention):
        return "flux"
    return "joint" if isinstance(module.processor, JointAttnProcessor2_0) else "plain"


def attention_heads(module: nn.Module) -> int | None:
    """The heads an attention module splits its projections into (None: not an attention)."""
    heads = getattr(module, "heads", None)
    return heads if isinstance(heads, int) else None


def set_attention_heads(module: Any, heads: int) -> None:
    """Tell an attention module it has `heads` heads (tensor parallelism: its local share);
    its processor reads this to reshape queries, keys and values."""
    module.heads = heads


def encode_prompts(
    pipe: Any,
    prompts: list[str],
    negative_prompt: str | None,
    device: torch.device,
    guidance: bool,
    height: int,
    width: int,
    clip_skip: int | None = None,
    micro: Any = None,
) -> Conditioning:
    """Encode one prompt per image with the pipeline's own `encode_prompt`. `clip_skip`: CLIP
    layers skipped from the end (SD, SDXL, SD3); `micro`: SDXL's micro-conditioning (the run's
    `sdxl` node; None: no crop, original and target size = the image's)."""
    if is_pixart(pipe):
        return _encode_pixart(pipe, prompts, negative_prompt, device, guidance, height, width)
    if is_sd3(pipe) or is_flux(pipe):
        return _encode_mmdit(pipe, prompts, negative_prompt, device, guidance, clip_skip)
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance, negative_prompt=negative,
                                          clip_skip=clip_skip)
        embeds = torch.cat([uncond, cond]) if guidance else cond
        return Conditioning(embeds, None)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guidance, negative_prompt=negative, clip_skip=clip_skip,
    )
    aesthetic = bool(pipe.config.get("requires_aesthetics_score"))
    positive, negative_ids = sdxl_time_ids(micro, height, width, aesthetic)
    time_ids = torch.tensor([positive], device=device).to(cond.dtype).repeat(len(prompts), 1)
    if guidance:
        uncond_ids = torch.tensor([negative_ids], device=device).to(cond.dtype)
        return Conditioning(
            torch.cat([uncond, cond]),
            {"text_embeds": torch.cat([uncond_pooled, pooled]),
             "time_ids": torch.cat([uncond_ids.repeat(len(prompts), 1), time_ids])},
        )
    return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids})


def sdxl_time_ids(micro: Any, height: int, width: int,
                  aesthetic: bool = False) -> tuple[list[float], list[float]]:
    """SDXL's time ids (original size, crop's top-left, target size) for the conditional and the
    unconditional branch, as StableDiffusionXLPipeline makes them: sizes default to the image's,
    and the negative ids equal the positive unless both negative sizes are given. The refiner's
    (`aesthetic`) end in an aesthetic score instead of the target size, as
    StableDiffusionXLImg2ImgPipeline makes them."""
    image = [height, width]
    micro = micro or {}
    original = list(micro.get("original_size") or image)
    target = list(micro.get("target_size") or image)
    crops = list(micro.get("crops_coords_top_left") or [0, 0])
    if aesthetic:
        negative_crops = list(micro.get("negative_crops_coords_top_left") or [0, 0])
        return ([*original, *crops, micro.get("aesthetic_score", 6.0)],
                [*(micro.get("negative_original_size") or original), *negative_crops,
                 micro.get("negative_aesthetic_score", 2.5)])
    positive = [*original, *crops, *target]
    neg_original = micro.get("negative_original_size")
    neg_target = micro.get("negative_target_size")
    if neg_original is None or neg_target is None:
        return positive, positive
    crops = micro.get("negative_crops_coords_top_left") or [0, 0]
    return positive, [*neg_original, *crops, *neg_target]


def _encode_pixart(pipe: Any, prompts: list[str], negative_prompt: str | None,
                   device: torch.device, guidance: bool, height: int, width: int) -> Conditioning:
    """T5 embeddings and their attention mask as PixArt's `encode_prompt` makes them (captions
    not cleaned; the pipeline's token limit, or the tokenizer's if shorter); PixArt-α's
    transformer also reads the resolution and aspect ratio."""
    cond, mask, uncond, uncond_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=guidance, negative_prompt=negative_prompt or "",
        device=device, clean_caption=False, max_sequence_length=_t5_tokens(pipe, pipe.tokenizer))
    added = {"encoder_attention_mask": mask}
    if pipe.transformer.config.get("use_additional_conditions"):
        added["resolution"] = torch.tensor([[height, width]], dtype=cond.dtype,
                                           device=device).repeat(len(prompts), 1)
        added["aspect_ratio"] = torch.tensor([[height / width]], dtype=cond.dtype,
                                             device=device).repeat(len(prompts), 1)
    if not guidance:
        return Conditioning(cond, added)
    negative = {**added, "encoder_attention_mask": uncond_mask}
    return Conditioning(torch.cat([uncond, cond]),
                        {k: torch.cat([negative[k], v]) for k, v in added.items()})


def t5_token_limit(pipeline_class: Any) -> int:
    """The T5 prompt length a DiT pipeline encodes by default (PixArt-α 120, PixArt-Σ 300, SD3
    256, Flux 512)."""
    signature = inspect.signature(pipeline_class.encode_prompt)
    return int(signature.parameters["max_sequence_length"].default)


def _t5_tokens(pipe: Any, t5_tokenizer: Any) -> int:
    """The T5 prompt length: the pipeline's default, or the tokenizer's limit if shorter."""
    return min(t5_token_limit(type(pipe)), int(t5_tokenizer.model_max_length))


def _encode_mmdit(pipe: Any, prompts: list[str], negative_prompt: str | None,
                  device: torch.device, guidance: bool, clip_skip: int | None) -> Conditioning:
    """SD3's CLIP-L/G + T5 embeddings or Flux's T5 embeddings, with the pooled CLIP embeds, as
    each pipeline's `encode_prompt` makes them (Flux takes no negative prompt)."""
    tokens = _t5_tokens(pipe, pipe.tokenizer_3 if is_sd3(pipe) else pipe.tokenizer_2)
    if is_flux(pipe):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device,
                                               max_sequence_length=tokens)
        return Conditioning(embeds, {"pooled_projections": pooled})
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompts, None, None, device=device, do_classifier_free_guidance=guidance,
        negative_prompt=negative, max_sequence_length=tokens, clip_skip=clip_skip)
    if not guidance:
        return Conditioning(cond, {"pooled_projections": pooled})
    return Conditioning(torch.cat([uncond, cond]),
                        {"pooled_projections": torch.cat([uncond_pooled, pooled])})


def _select_batch(value: Any, batch: int, rows: slice) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _select_batch(v, batch, rows) for k, v in value.items()}
    return value


def call_sample(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A denoiser call's sample: a UNet's `sample`, a transformer's `hidden_states`."""
    if args:
        return args[0]  # type: ignore[no-any-return]
    return kwargs["sample" if "sample" in kwargs else "hidden_states"]  # type: ignore[no-any-return]


def call_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, Fraction]:
    """(latent rows of a denoiser call, entries of its sample's dim −2 per latent row). A
    latent image's rows are its dim −2 (1 per row); Flux's packed tokens run row-major over 2×2
    patches, so a latent row is half a token row: token columns / 2 entries, a fraction when the
    token columns are odd (bands are whole token rows, so every band's count is whole). The
    token rows of a call made by denoiser_forward are known without reading the ids (no
    device-to-host copy; meta tensors in the planner); another caller's are read from the last
    image id."""
    sample = call_sample(args, kwargs)
    ids = kwargs.get("img_ids")
    if ids is None:
        return int(sample.shape[-2]), Fraction(1)
    token_rows = _FLUX_TOKEN_ROWS.get() or int(ids[-1, 1]) + 1
    return token_rows * FLUX_PACK, Fraction(int(sample.shape[-2]) // token_rows, FLUX_PACK)


def split_denoiser_call(args: tuple[Any, ...], kwargs: dict[str, Any], batch_rows: slice,
                        band_rows: slice) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """A denoiser call's arguments for one batch slice and one band of latent rows; also the
    full sample (a UNet's `sample`, a transformer's `hidden_states`). Flux's image ids are cut
    to the band's tokens, so its rotary positions stay the true ones."""
    name = "sample" if "sample" in kwargs else "hidden_states"
    sample = call_sample(args, kwargs)
    batch = sample.shape[0]
    new_args = tuple(_select_batch(a, batch, batch_rows) for a in args)
    new_kwargs = {k: _select_batch(v, batch, batch_rows) for k, v in kwargs.items()}
    rows, per_row = call_rows(args, kwargs)
    start, stop, _ = band_rows.indices(rows)
    band_index = slice(int(start * per_row), int(stop * per_row))
    band = sample[batch_rows][..., band_index, :]
    if "img_ids" in kwargs:
        new_kwargs["img_ids"] = kwargs["img_ids"][band_index]
    if args:
        new_args = (band, *new_args[1:])
    else:
        new_kwargs[name] = band
    return new_args, new_kwargs, sample


def denoiser_output_sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def with_output_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


def denoiser_forward(
    model: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The noise prediction (or flow velocity) of a UNet or a transformer for latent images
    (B, C, H, W), as each family's pipeline calls it: PixArt's learned-variance channels dropped,
    Flux's latents packed in 2×2 patches with their image ids and unpacked again."""
    if not is_transformer(model):
        out = model(latents, t, encoder_hidden_states=cond.embeds,
                    added_cond_kwargs=cond.added, return_dict=False)
        return out[0]  # type: ignore[no-any-return]
    added = cond.added or {}
    timestep = t.reshape(1).expand(latents.shape[0]) if t.dim() == 0 else t
    config: Any = model.config
    if _packs_latents(config):
        return _flux_forward(model, latents, timestep, cond)
    if "pooled_projection_dim" in config:  # SD3
        out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.embeds,
                    pooled_projections=added["pooled_projections"], return_dict=False)
        return out[0]  # type: ignore[no-any-return]
    noise: torch.Tensor = model(
        latents, encoder_hidden_states=cond.embeds,
        encoder_attention_mask=added.get("encoder_attention_mask"), timestep=timestep,
        added_cond_kwargs={"resolution": added.get("resolution"),
                           "aspect_ratio": added.get("aspect_ratio")},
        return_dict=False)[0]
    if config.out_channels // 2 == config.in_channels:
        noise = noise.chunk(2, dim=1)[0]
    return noise


def _flux_forward(model: Any, latents: torch.Tensor, timestep: torch.Tensor,
                  cond: Conditioning) -> torch.Tensor:
    """FluxPipeline's transformer call: packed latents, image ids over the token grid, zero
    text ids, the timestep over 1000."""
    batch, channels, rows, cols = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, rows, cols)
    img_ids = FluxPipeline._prepare_latent_image_ids(
        batch, rows // FLUX_PACK, cols // FLUX_PACK, latents.device, latents.dtype)
    txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
    added = cond.added or {}
    known = _FLUX_TOKEN_ROWS.set(rows // FLUX_PACK)
    try:
        out = model(hidden_states=packed, timestep=timestep.to(latents.dtype) / 1000,
                    guidance=added.get("guidance"),
                    pooled_projections=added["pooled_projections"],
                    encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
    finally:
        _FLUX_TOKEN_ROWS.reset(known)
    # _unpack_latents takes pixel sizes and the VAE's factor: latent sizes with a factor of 1.
    return FluxPipeline._unpack_latents(out, rows, cols, 1)  # type: ignore[no-any-return]


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


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW pixels to uint8 NHWC, rounded as diffusers rounds when it makes PIL images."""
    images = VaeImageProcessor().postprocess(pixels.float(), output_type="np")
    return (images * 255).round().astype(np.uint8)


def unknown_words(tokenizer: Any, texts: list[str]) -> list[str]:
    """The words of `texts` that `tokenizer` maps to its unknown token, in first-seen order."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    words = dict.fromkeys(w for text in texts for w in re.findall(r"[\w']+", text.lower()))
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False).input_ids]
