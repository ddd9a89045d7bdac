"""What a model family tells the rest of paraflow: the `Family` protocol, and `BaseFamily`, the
defaults a family overrides (diffusers' conventions shared by most denoisers).

A family is resolved once from the denoiser's class (registry.py) and then asked, never sniffed:
stages, strategies and the planner call its methods and name no family. Methods take the
denoiser module or its config (a loaded module, one on the meta device, or a bare config), so
pre-launch checks work without weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from paraflow.families.shift import resolution_shift


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, batch ordered [unconditional..., conditional...]
    when guidance is on (as diffusers orders it)."""

    embeds: torch.Tensor
    # Per-image extras, by the family's names (SDXL's pooled embeds and time ids, PixArt's text
    # mask, the MMDiTs' pooled embeds, Flux-dev's guidance).
    added: dict[str, torch.Tensor] | None

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        added = {k: v.to(device=device, dtype=dtype) for k, v in (self.added or {}).items()}
        return Conditioning(self.embeds.to(device=device, dtype=dtype), added or None)

    def select(self, rows: slice, batch: int) -> Conditioning:
        """The images `rows` of a batch of `batch` (per-image tensors only)."""
        def pick(value: torch.Tensor) -> torch.Tensor:
            return value[rows] if value.dim() >= 1 and value.shape[0] == batch else value
        added = {k: pick(v) for k, v in (self.added or {}).items()}
        return Conditioning(pick(self.embeds), added or None)


def _downsampling(block_out_channels: Sequence[int]) -> int:
    """2 per down block but the last, in diffusers' VAEs and UNets alike."""
    return int(2 ** (len(block_out_channels) - 1))


class Family(Protocol):
    """A model family (its denoiser classes, by name, in `denoisers`)."""

    name: ClassVar[str]
    denoisers: ClassVar[tuple[str, ...]]
    flow_matching: ClassVar[bool]  # img2img's strength rounds as the flow pipelines do
    takes_lora: ClassVar[bool]
    can_inpaint: ClassVar[bool]
    tensor_plan: ClassVar[dict[str, str]]  # strategy=tensor's default: module glob -> style

    # -- shapes, from the denoiser's config
    def downsampling(self, config: Mapping[str, Any]) -> int: ...
    def size_unit(self, config: Mapping[str, Any]) -> int: ...
    def latent_channels(self, config: Mapping[str, Any]) -> int: ...
    def context_width(self, config: Mapping[str, Any]) -> int: ...
    def conditioning_extras(self, config: Mapping[str, Any],
                            tokens: int) -> dict[str, tuple[int, ...]] | None: ...
    def prompt_tokenizers(self) -> tuple[tuple[str, bool], ...]: ...
    def inpainting(self, config: Mapping[str, Any]) -> bool: ...

    # -- the run
    def guidance_distilled(self, config: Mapping[str, Any]) -> bool: ...
    def uses_guidance(self, config: Mapping[str, Any], guidance_scale: float) -> bool: ...
    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning: ...
    def prepare_conditioning(self, config: Mapping[str, Any], cond: Conditioning,
                             guidance_scale: float, batch: int) -> Conditioning: ...
    def set_timesteps(self, scheduler: Any, steps: int, device: torch.device,
                      config: Mapping[str, Any], latent_shape: Sequence[int]) -> None: ...
    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor: ...

    # -- modules a strategy swaps or wraps
    def replicated_input_convs(self, model: nn.Module) -> set[str]: ...
    def patch_embedding(self, model: nn.Module) -> nn.Module | None: ...
    def band_patch_embed(self, embed: nn.Module, band: torch.Tensor, rows: int,
                         first_row: int) -> torch.Tensor: ...
    def attention_text_tokens(self, config: Mapping[str, Any], text_tokens: int) -> int: ...
    def resolution_bins(self, config: Mapping[str, Any]) -> dict[str, list[float]] | None: ...
    def resize_from_bin(self, pixels: torch.Tensor, height: int,
                        width: int) -> torch.Tensor: ...
    def attention_kind(self, module: nn.Module) -> str: ...

    # -- step caches (paraflow/cache)
    caches: ClassVar[tuple[str, ...]]
    def cache_blocks(self, model: nn.Module) -> list[nn.Module]: ...
    def split_block_output(self, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def join_block_output(self, like: Any, hidden: torch.Tensor,
                          text: torch.Tensor | None) -> Any: ...
    def cache_probe(self, model: nn.Module) -> nn.Module: ...
    def skipped_blocks(self, model: nn.Module, kind: str) -> list[nn.Module]: ...

    # -- compilation (paraflow/compile.py)
    def compile_regions(self, model: nn.Module) -> list[nn.Module]: ...


class BaseFamily:
    """Defaults: a denoiser whose input is the latent image itself (no packing), no extras."""

    name: ClassVar[str] = ""
    denoisers: ClassVar[tuple[str, ...]] = ()
    flow_matching: ClassVar[bool] = False
    takes_lora: ClassVar[bool] = True
    can_inpaint: ClassVar[bool] = False
    tensor_plan: ClassVar[dict[str, str]] = {}
    # The step caches it takes (paraflow/cache): both work on the residual stream's blocks.
    caches: ClassVar[tuple[str, ...]] = ("first_block", "taylorseer")
    # The transformer's block lists, run one after another (first-block caching's order).
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")

    def downsampling(self, config: Mapping[str, Any]) -> int:
        """Latent rows per row at the denoiser's coarsest level (a transformer's token rows):
        bands are whole multiples of it."""
        return int(config.get("patch_size") or 1)

    def size_unit(self, config: Mapping[str, Any]) -> int:
        """Latent rows (and columns) every image side must be a multiple of: a transformer's
        whole tokens; 1 for a UNet, which pads its own levels."""
        return self.downsampling(config)

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        return int(config["in_channels"])

    def context_width(self, config: Mapping[str, Any]) -> int:
        """Width of the text embeddings the denoiser reads."""
        return int(config["cross_attention_dim"])

    def conditioning_extras(self, config: Mapping[str, Any],
                            tokens: int) -> dict[str, tuple[int, ...]] | None:
        """Conditioning.added's entries, name → shape per image (for the planner and the
        service's embedding cache)."""
        return None

    def prompt_tokenizers(self) -> tuple[tuple[str, bool], ...]:
        """The tokenizers whose sequences the denoiser reads one after another (name, is T5)."""
        return (("tokenizer", False),)

    def inpainting(self, config: Mapping[str, Any]) -> bool:
        """A denoiser that reads the mask and the masked image beside the latents."""
        return False

    def guidance_distilled(self, config: Mapping[str, Any]) -> bool:
        return False

    def uses_guidance(self, config: Mapping[str, Any], guidance_scale: float) -> bool:
        """Classifier-free guidance runs when the scale exceeds 1 (and the denoiser is not
        guidance-distilled), as in diffusers."""
        return guidance_scale > 1.0 and not self.guidance_distilled(config)

    def encode_prompts(self, pipe: Any, prompts: list[str], negative_prompt: str | None,
                       device: torch.device, guidance: bool, height: int, width: int,
                       clip_skip: int | None = None, micro: Any = None) -> Conditioning:
        raise NotImplementedError(f"family {self.name} encodes no prompts")

    def prepare_conditioning(self, config: Mapping[str, Any], cond: Conditioning,
                             guidance_scale: float, batch: int) -> Conditioning:
        """The conditioning the denoise loop passes each step (e.g. an embedded guidance)."""
        return cond

    def set_timesteps(self, scheduler: Any, steps: int, device: torch.device,
                      config: Mapping[str, Any], latent_shape: Sequence[int]) -> None:
        """`steps` steps, shifted by the image's token count where the scheduler shifts
        dynamically (as SD3's pipeline does)."""
        unit = self.downsampling(config)
        tokens = (latent_shape[-2] // unit) * (latent_shape[-1] // unit)
        scheduler.set_timesteps(steps, device=device,
                                **resolution_shift(scheduler, tokens, max_shift=1.16))

    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning, first_row: int = 0) -> torch.Tensor:
        """The noise prediction (or velocity) for latent images (B, C, H, W) that are rows
        [first_row, first_row + H) of the image, as the family's pipeline calls the model."""
        raise NotImplementedError

    def replicated_input_convs(self, model: nn.Module) -> set[str]:
        """Convolutions whose input every rank holds whole (halo rows sliced, not exchanged)."""
        return set()

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        """A transformer's patch embedding (latent → tokens plus positions), which a band
        strategy swaps for band_patch_embed; None: positions need no band (a UNet)."""
        return None

    def band_patch_embed(self, embed: nn.Module, band: torch.Tensor, rows: int,
                         first_row: int) -> torch.Tensor:
        """What `embed` gives for latent rows [first_row, first_row + band rows) of an image
        `rows` latent rows tall: the band's tokens with their true positions."""
        raise NotImplementedError(f"family {self.name} has no patch embedding")

    def attention_text_tokens(self, config: Mapping[str, Any], text_tokens: int) -> int:
        """Text tokens a joint attention sees beside the image for `text_tokens` of prompt
        (a model may add its own, e.g. register tokens)."""
        return text_tokens

    def resolution_bins(self, config: Mapping[str, Any]) -> dict[str, list[float]] | None:
        """Aspect ratio → (height, width) the model was trained at, when its pipeline generates
        at the nearest one and resizes to the asked size (resolution binning); None: it does
        not."""
        return None

    def resize_from_bin(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Pixels generated at a bin, resized and centre-cropped to height × width."""
        raise NotImplementedError(f"family {self.name} generates at the asked size")

    def attention_kind(self, module: nn.Module) -> str:
        """How a self-attention module mixes text in: "plain" (it does not), "joint" (image
        tokens, then text) or "text_first" (text, then image tokens)."""
        return "plain"

    def cache_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks of the denoiser's residual stream, in the order they run ([] for a
        denoiser without one: a UNet)."""
        return [block for name in self.block_lists
                for block in (getattr(model, name, None) or [])]

    def split_block_output(self, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, text states or None) of a block's output: a tensor, or diffusers'
        MMDiT blocks' (encoder_hidden_states, hidden_states)."""
        return (out, None) if isinstance(out, torch.Tensor) else (out[1], out[0])

    def join_block_output(self, like: Any, hidden: torch.Tensor,
                          text: torch.Tensor | None) -> Any:
        """A block's output in the structure of `like` (one it returned before)."""
        return hidden if isinstance(like, torch.Tensor) else (text, hidden)

    def cache_probe(self, model: nn.Module) -> nn.Module:
        """The block whose output decides a first-block cache where there is no residual
        stream (a UNet's first down block)."""
        raise NotImplementedError(f"family {self.name} caches through cache_blocks")

    def compile_regions(self, model: nn.Module) -> list[nn.Module]:
        """The blocks `compile=regional` compiles one by one: the residual stream's (alike, so
        one compiled graph serves them all)."""
        return self.cache_blocks(model)

    def skipped_blocks(self, model: nn.Module, kind: str) -> list[nn.Module]:
        """The blocks a reused step of cache `kind` answers from the cache (no residual
        stream)."""
        raise NotImplementedError(f"family {self.name} caches through cache_blocks")


# --- attention, as diffusers' Attention modules expose it (every family) ------------------------

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


def attention_heads(module: nn.Module) -> int | None:
    """The heads an attention module splits its projections into (None: not an attention)."""
    heads = getattr(module, "heads", None)
    return heads if isinstance(heads, int) else None


def set_attention_heads(module: Any, heads: int) -> None:
    """Tell an attention module it has `heads` heads (tensor parallelism: its local share)."""
    module.heads = heads
