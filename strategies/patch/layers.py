"""Swapping a model's layers for their patch-parallel versions (the originals are kept inside)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from torch import nn

from paraflow.families.base import BaseFamily, Family, set_self_attention_processors
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor
from paraflow.strategies.patch.bands import conv_halo
from paraflow.strategies.patch.conv import PatchConv2d
from paraflow.strategies.patch.embed import BandPatchEmbed
from paraflow.strategies.patch.groupnorm import PatchGroupNorm
from paraflow.strategies.patch.joint import band_processor
from paraflow.strategies.patch.state import PatchState


def reaches_other_rows(conv: nn.Conv2d) -> bool:
    """Whether a band's output rows read input rows outside the band (a 1×1 convolution or a
    transformer's stride-k k×k patch projection does not)."""
    padding = conv.padding[0] if isinstance(conv.padding, tuple) else 1
    return conv_halo(conv.kernel_size[0], conv.stride[0], int(padding),
                     conv.dilation[0]) != (0, 0)


def place_patch_embedding(model: nn.Module, family: Family, state: PatchState) -> None:
    """A transformer's patch embedding → BandPatchEmbed (true positions for a band); a UNet has
    none."""
    embed = family.patch_embedding(model)
    if embed is None or isinstance(embed, BandPatchEmbed):
        return
    name = next(n for n, m in model.named_modules() if m is embed)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child,
            BandPatchEmbed(embed, state, family))


def swap_patch_layers(model: nn.Module, state: PatchState, prefix: str = "",
                      replicated: Collection[str] = (),
                      attention: Callable[..., Any] = PatchSelfAttnProcessor,
                      family: Family | None = None) -> dict[str, int]:
    """Convolutions that reach other rows → PatchConv2d, GroupNorm → PatchGroupNorm,
    self-attention → `attention` (the patch processor by default). Other convolutions, linear
    layers, LayerNorm and cross-attention stay local. The convolutions named in `replicated`
    read the model's whole input (state.whole_input). `family`: the denoiser's (attention
    kinds, patch embedding); None for a VAE (plain attention)."""
    family = family or BaseFamily()
    swaps: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (PatchConv2d, PatchGroupNorm)):
            continue
        if isinstance(module, nn.Conv2d) and reaches_other_rows(module):
            swaps.append((name, PatchConv2d(module, state, prefix + name,
                                                    replicated=name in replicated)))
        elif isinstance(module, nn.GroupNorm):
            swaps.append((name, PatchGroupNorm(module, state, prefix + name)))
    for name, wrapper in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
    attn = set_self_attention_processors(
        model, lambda name, module: band_processor(family.attention_kind(module),
                                                   attention(state, prefix + name)))
    place_patch_embedding(model, family, state)
    convs = sum(isinstance(w, PatchConv2d) for _, w in swaps)
    return {"conv": convs, "groupnorm": len(swaps) - convs, "self_attention": attn}
