"""The tensor-parallel pieces DTensor's linear styles do not cover, written by hand.

Each rank keeps the `rank`-th of `n` contiguous slices of a split dimension. Convolutions and
GroupNorm are sliced in place (their classes stay the same, so the model code does not notice);
the one layer that communicates is a convolution split by input channels, whose partial sums are
all-reduced through the `reduce` callable the strategy hands it (the communicator, so bytes are
counted). The same callable finishes the row-wise linears that DTensor leaves as partial sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over the tensor-parallel ranks, in place
Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every tensor-parallel rank's piece


def shard_slice(size: int, n: int, rank: int) -> slice:
    """The `rank`-th of `n` equal contiguous pieces of range(size) (size must divide by n)."""
    if size % n:
        raise ValueError(f"{size} does not divide into {n} equal pieces")
    step = size // n
    return slice(rank * step, (rank + 1) * step)


def _param(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=like.requires_grad)


def shard_conv_out(conv: nn.Conv2d, n: int, rank: int) -> None:
    """Conv split by output channels: this rank keeps its slice of the filters and bias.
    No communication; the output stays split by channels (consumed by a split GroupNorm)."""
    part = shard_slice(conv.out_channels, n, rank)
    conv.weight = _param(conv.weight[part], conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[part], conv.bias)
    conv.out_channels //= n


def shard_group_norm(norm: nn.GroupNorm, n: int, rank: int) -> None:
    """GroupNorm over this rank's whole groups of a channel-split input. Statistics are per
    group, so keeping whole groups is exact; no communication."""
    part = shard_slice(norm.num_channels, n, rank)
    if norm.num_groups % n:
        raise ValueError(f"{norm.num_groups} groups do not divide into {n} pieces")
    if norm.weight is not None:
        norm.weight = _param(norm.weight[part], norm.weight)
    if norm.bias is not None:
        norm.bias = _param(norm.bias[part], norm.bias)
    norm.num_groups //= n
    norm.num_channels //= n


class InputShardedConv2d(nn.Conv2d):
    """Conv split by input channels: each rank convolves its channel slice into a partial sum
    (no bias), one all-reduce of the B×C_out×H×W output sums them, then the bias is added once."""

    reduce: Reduce

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, n: int, rank: int, reduce: Reduce) -> InputShardedConv2d:
        if conv.groups != 1:
            raise ValueError("grouped convolutions cannot be split by input channels")
        part = shard_slice(conv.in_channels, n, rank)
        weight = conv.weight
        new = cls(conv.in_channels // n, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                  stride=conv.stride, padding=conv.padding, dilation=conv.dilation,  # type: ignore[arg-type]
                  bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device="meta", dtype=weight.dtype)
        new.weight = _param(weight[:, part], weight)
        if conv.bias is not None:
            new.bias = _param(conv.bias, conv.bias)
        new.reduce = reduce
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(self._conv_forward(x, self.weight, None))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


def shard_linear_gathered(linear: nn.Linear, n: int, rank: int, gather: Gather) -> None:
    """Linear by output features whose whole output every rank needs (a DiT's adaLN modulation:
    one large weight, a B × out output): this rank computes its slice of the features, one
    all-gather through `gather` puts the slices back in order."""
    part = shard_slice(linear.out_features, n, rank)
    linear.weight = _param(linear.weight[part], linear.weight)
    if linear.bias is not None:
        linear.bias = _param(linear.bias[part], linear.bias)
    linear.out_features //= n
    linear.register_forward_hook(
        lambda module, args, out: torch.cat(gather(out.contiguous()), dim=-1))


def move_bias_out(linear: nn.Linear) -> nn.Parameter | None:
    """Before a row-wise split: take the bias out of the layer, so the sharded layer yields a pure
    partial sum; `finish_rowwise` adds it back once, after the reduce."""
    bias = linear.bias
    linear.register_parameter("bias", None)
    return bias


def finish_rowwise(linear: nn.Linear, reduce: Reduce, bias: nn.Parameter | None) -> None:
    """After a row-wise split (DTensor output left as a local partial sum): all-reduce the
    B×T×C_out output through `reduce`, then add the bias (kept as `bias_after_reduce`). The hook
    is registered after DTensor's own output hook, so it runs after it."""
    if bias is not None:
        linear.register_parameter("bias_after_reduce", bias)
    inner = linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        # Under inference mode DTensor re-derives the sharding of a row-wise linear on every call
        # (~10 ms on CPU); with grad off but inference mode off it takes its cached path.
        with torch.inference_mode(False), torch.no_grad():
            return inner(x)

    linear.forward = forward  # type: ignore[method-assign,assignment]

    def hook(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = reduce(out)
        extra = getattr(module, "bias_after_reduce", None)
        return out if extra is None else out + extra

    linear.register_forward_hook(hook)


def interleave_gated(linear: nn.Linear, n: int) -> None:
    """A gated projection (GEGLU: output [value, gate], chunked in two after it) reordered to
    [value_0, gate_0, value_1, gate_1, …], so a contiguous column-wise split hands rank r the
    matching halves [value_r, gate_r]. Same function, rows permuted; no communication."""
    half = linear.out_features // 2
    if linear.out_features % (2 * n):
        raise ValueError(f"{linear.out_features} gated features do not divide into {n} pieces")

    def permute(t: torch.Tensor) -> torch.Tensor:
        value, gate = t[:half], t[half:]
        pieces = [p for r in range(n) for p in (value[shard_slice(half, n, r)],
                                                gate[shard_slice(half, n, r)])]
        return torch.cat(pieces)

    linear.weight = _param(permute(linear.weight), linear.weight)
    if linear.bias is not None:
        linear.bias = _param(permute(linear.bias), linear.bias)


def interleave_concat_inputs(linear: nn.Linear, n: int) -> None:
    """A linear over cat([x, y]) whose x (as wide as the output) and y arrive split by columns
    (Flux's single-stream proj_out over [attention, MLP]): input columns reordered to [x_0, y_0,
    x_1, y_1, …], so a contiguous row-wise split hands rank r its own [x_r, y_r]. Same function,
    columns permuted; no communication."""
    first, second = linear.out_features, linear.in_features - linear.out_features
    if first % n or second % n:
        raise ValueError(f"inputs of {first} + {second} features do not divide into {n} pieces")
    order = torch.cat([torch.cat([torch.arange(first)[shard_slice(first, n, r)],
                                  first + torch.arange(second)[shard_slice(second, n, r)]])
                       for r in range(n)])
    linear.weight = _param(linear.weight[:, order], linear.weight)
