"""Swapping a model's layers for their patch-parallel versions (the originals are kept inside)."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from paraflow.adapters import set_self_attention_processors
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor
from paraflow.strategies.patch.conv import PatchConv2d
from paraflow.strategies.patch.groupnorm import PatchGroupNorm
from paraflow.strategies.patch.state import PatchState


def swap_patch_layers(model: nn.Module, state: PatchState, prefix: str = "",
                      replicated: Collection[str] = ()) -> dict[str, int]:
    """k×k convolutions → PatchConv2d, GroupNorm → PatchGroupNorm, self-attention → the patch
    processor. 1×1 convolutions, linear layers, LayerNorm and cross-attention stay local. The
    convolutions named in `replicated` read the model's whole input (state.whole_input)."""
    swaps: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, (PatchConv2d, PatchGroupNorm)):
            continue
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            swaps.append((name, PatchConv2d(module, state, prefix + name,
                                                    replicated=name in replicated)))
        elif isinstance(module, nn.GroupNorm):
            swaps.append((name, PatchGroupNorm(module, state, prefix + name)))
    for name, wrapper in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
    attn = set_self_attention_processors(
        model, lambda name: PatchSelfAttnProcessor(state, prefix + name))
    convs = sum(isinstance(w, PatchConv2d) for _, w in swaps)
    return {"conv": convs, "groupnorm": len(swaps) - convs, "self_attention": attn}
