"""UNet denoisers: Stable Diffusion 1.x/2.x, SDXL (base and refiner, with its added text and
time conditioning) and their inpainting UNets (9 input channels: latents, mask, masked image)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from torch import nn

from paraflow.families.base import BaseFamily, Conditioning, _downsampling

TIME_IDS = 6  # SDXL micro-conditioning: original size, crop offset, target size (2 each)
_ATTENTION = "*.attn[12]"
_FEED_FORWARD = "*.ff.net"
_RESNETS = "*.resnets.*"


class UNetFamily(BaseFamily):
    name = "unet"
    caches = ("first_block", "deepcache")
    denoisers = ("UNet2DConditionModel",)
    can_inpaint = True
    tensor_plan = {
        f"{_ATTENTION}.to_q": "colwise", f"{_ATTENTION}.to_k": "colwise",
        f"{_ATTENTION}.to_v": "colwise", f"{_ATTENTION}.to_out.0": "rowwise",
        _ATTENTION: "heads",
        f"{_FEED_FORWARD}.0.proj": "colwise_gated", f"{_FEED_FORWARD}.2": "rowwise",
        f"{_RESNETS}.conv1": "conv_out", f"{_RESNETS}.time_emb_proj": "colwise",
        f"{_RESNETS}.norm2": "groupnorm", f"{_RESNETS}.conv2": "conv_in",
    }

    def downsampling(self, config: Mapping[str, Any]) -> int:
        return _downsampling(config["block_out_channels"])

    def size_unit(self, config: Mapping[str, Any]) -> int:
        return 1  # the UNet's up blocks take their skip's size: any latent size runs

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        return int(config["out_channels"])  # an inpainting UNet reads more than it writes

    def inpainting(self, config: Mapping[str, Any]) -> bool:
        return int(config["in_channels"]) > int(config["out_channels"])

    def guidance_distilled(self, config: Mapping[str, Any]) -> bool:
        """An LCM-style UNet with a guidance embedding takes no classifier-free guidance."""
        return config.get("time_cond_proj_dim") is not None

    def conditioning_extras(self, config: Mapping[str, Any],
                            tokens: int) -> dict[str, tuple[int, ...]] | None:
        """SDXL's added conditioning, name → width per image; None for SD."""
        if config.get("addition_embed_type") != "text_time":
            return None
        time_width = TIME_IDS * int(config["addition_time_embed_dim"])
        return {"text_embeds": (int(config["projection_class_embeddings_input_dim"])
                                - time_width,), "time_ids": (TIME_IDS,)}

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning:
        """The pipeline's own `encode_prompt`; SDXL's pooled embeds and micro-conditioning time
        ids (`micro`: the run's `sdxl` node; None: no crop, sizes = the image's)."""
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        if not _is_sdxl(pipe):
            cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance,
                                              negative_prompt=negative, clip_skip=clip_skip)
            return Conditioning(torch.cat([uncond, cond]) if guidance else cond, None)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative, clip_skip=clip_skip)
        aesthetic = bool(pipe.config.get("requires_aesthetics_score"))
        positive, negative_ids = sdxl_time_ids(micro, height, width, aesthetic)
        time_ids = torch.tensor([positive], device=device).to(cond.dtype).repeat(len(prompts), 1)
        if not guidance:
            return Conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids})
        uncond_ids = torch.tensor([negative_ids], device=device).to(cond.dtype)
        return Conditioning(
            torch.cat([uncond, cond]),
            {"text_embeds": torch.cat([uncond_pooled, pooled]),
             "time_ids": torch.cat([uncond_ids.repeat(len(prompts), 1), time_ids])})

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor:
        out = model(latents, timestep, encoder_hidden_states=cond.embeds,
                    added_cond_kwargs=cond.added, return_dict=False)
        return out[0]  # type: ignore[no-any-return]

    def cache_probe(self, model: nn.Module) -> nn.Module:
        unet: Any = model
        return unet.down_blocks[0]  # type: ignore[no-any-return]

    def compile_regions(self, model: nn.Module) -> list[nn.Module]:
        """Every down block, the mid block and every up block (a UNet has no residual stream
        of alike blocks; its resolution levels compile apart)."""
        unet: Any = model
        return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]

    def skipped_blocks(self, model: nn.Module, kind: str) -> list[nn.Module]:
        """first_block: everything past the first down block (conv_norm_out and conv_out
        then repeat the last full step's prediction); deepcache: the deep blocks, between the
        first down block and the last up block (which runs on the cached deep features)."""
        unet: Any = model
        deep = [*unet.down_blocks[1:], unet.mid_block]
        return [*deep, *unet.up_blocks] if kind == "first_block" else \
            [*deep, *unet.up_blocks[:-1]]

    def replicated_input_convs(self, model: nn.Module) -> set[str]:
        """`conv_in` reads the latent itself (unless the UNet rescales it first), so its halo
        rows can be sliced from the current latent instead of exchanged."""
        conv_in = getattr(model, "conv_in", None)
        config: Any = getattr(model, "config", {})
        if isinstance(conv_in, nn.Conv2d) and not config.get("center_input_sample", False):
            return {"conv_in"}
        return set()


def _is_sdxl(pipe: Any) -> bool:
    """SDXL's base, or its refiner (an img2img pipeline class): pooled embeds and time ids."""
    return isinstance(pipe, (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline))


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


