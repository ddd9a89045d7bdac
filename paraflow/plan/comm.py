"""Bytes a rank sends, counted as paraflow.comm.Communicator counts them (ring algorithms): an
all-gather of an n-byte piece counts n·(N−1), an all-reduce of n bytes int(2·n·(N−1)/N) per call.
The pieces come from the layer shapes of a meta-device call of the plain, unsplit module:

  patch, per k×k conv:        B · C_in · W · (top + bottom halo rows) · elt   (bands.conv_halo);
                              none for a conv whose input every rank holds (`replicated`)
  patch, per GroupNorm:       B · groups · 2 (sum, sum of squares) · 8        (float64)
  patch, per self-attention:  B · tokens of the tallest band · 2 (K, V) · inner · elt
  patch, UNet output:         B · C_out · rows of the tallest band · W · elt, over the replica
  tensor, per row-wise linear and input-split conv: its output bytes, all-reduced
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from paraflow.adapters import is_self_attention
from paraflow.strategies.patch.bands import BandPlan, conv_halo


@dataclass
class Pieces:
    """One rank's pieces of one model call, bytes in call order, by kind."""

    conv: list[int] = field(default_factory=list)
    norm: list[int] = field(default_factory=list)
    attention: list[int] = field(default_factory=list)
    reduced: list[int] = field(default_factory=list)  # tensor: outputs of all-reduced layers
    output: int = 0  # bytes of the model's output (this rank's band)

    def exchanged(self, norms: bool = True) -> int:
        return sum(self.conv) + sum(self.attention) + (sum(self.norm) if norms else 0)


def layer_pieces(model: nn.Module, call: Callable[[], Any], band: BandPlan | None,
                 reduced: Sequence[str] = (), replicated: Collection[str] = ()) -> Pieces:
    """Run `call()` (which calls `model` on meta tensors of this rank's band) and collect the
    pieces its patch layers would exchange (`band`: the band plan, for attention's padding) and
    the output bytes of the modules named in `reduced`."""
    found = Pieces()
    names = set(reduced)

    def conv(module: nn.Conv2d, args: tuple[torch.Tensor, ...]) -> None:
        top, bottom = conv_halo(module.kernel_size[0], module.stride[0], int(module.padding[0]),
                                module.dilation[0])
        b, c, _, w = args[0].shape
        found.conv.append(b * c * w * (top + max(bottom, 0)) * args[0].element_size())

    def norm(module: nn.GroupNorm, args: tuple[torch.Tensor, ...]) -> None:
        found.norm.append(args[0].shape[0] * module.num_groups * 2 * 8)

    def attention(module: Any, args: tuple[torch.Tensor, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("encoder_hidden_states") is not None:
            return
        x = args[0] if args else kwargs["hidden_states"]
        tokens = x.shape[1] if x.dim() == 3 else x.shape[2] * x.shape[3]
        longest = max(band.scaled(tokens)) if band is not None else tokens
        found.attention.append(x.shape[0] * longest * 2 * module.to_k.out_features
                               * x.element_size())

    def output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        found.reduced.append(out.numel() * out.element_size())

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1 and name not in replicated:
            hooks.append(module.register_forward_pre_hook(conv))
        elif isinstance(module, nn.GroupNorm):
            hooks.append(module.register_forward_pre_hook(norm))
        elif is_self_attention(module):
            hooks.append(module.register_forward_pre_hook(attention, with_kwargs=True))
        if name in names:
            hooks.append(module.register_forward_hook(output))
    try:
        with torch.inference_mode():
            out = call()
    finally:
        for hook in hooks:
            hook.remove()
    found.output = out.numel() * out.element_size()
    return found


def all_gather(piece: int, n: int) -> int:
    return piece * (n - 1)


def all_reduce(nbytes: int, n: int) -> int:
    return int(2 * nbytes * (n - 1) / n) if n > 1 else 0


def padded(nbytes: int, rows: int, tallest: int) -> int:
    """A band's bytes padded to the tallest band (every rank sends the same shape)."""
    return nbytes // rows * tallest


def gather_by_index(n: int, most: int, row_bytes: Sequence[int]) -> int:
    """paraflow.strategies.base.gather_by_index over `n` ranks, `most` images on one of them:
    one uneven all-gather per entry of `row_bytes` (ids: 8, images, latents when kept), each
    after an all-gather of the int64 count."""
    if n == 1:
        return 0
    return sum(all_gather(8, n) + all_gather(most * size, n) for size in row_bytes)
