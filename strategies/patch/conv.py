"""PatchConv2d: a k×k convolution on this rank's band of rows.

Split: the input rows (each rank its band). Communicated: the halo rows the kernel reaches into
the neighbouring bands — each rank all-gathers its top `bottom` and bottom `top` rows, fresh
(synchronous steps) or from the previous step (displaced steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paraflow.errors import ParaflowError
from strategies.patch.bands import conv_halo, conv_keeps_bands, halo_sources
from strategies.patch.state import PatchState


class PatchConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, state: PatchState, key: str) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ParaflowError(f"{key}: patch convolution supports zero padding given as "
                                f"numbers, not {conv.padding_mode!r} / {conv.padding!r}")
        self.conv, self.state, self.key = conv, state, key
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        padding, dilation = int(conv.padding[0]), conv.dilation[0]
        self.geometry = (kernel, stride, padding, dilation)
        self.top, self.bottom = conv_halo(kernel, stride, padding, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, conv = self.state, self.conv
        sizes = state.band.scaled(x.shape[-2])
        if not conv_keeps_bands(sum(sizes), *self.geometry):
            raise ParaflowError(f"{self.key}: a {self.geometry} convolution over {sum(sizes)} "
                                "rows does not map bands to bands")
        me = state.band.index
        top, bottom = self.top, max(self.bottom, 0)
        above, below = halo_sources(sizes, me, top, bottom)
        rows = x.shape[-2]
        piece = torch.cat([x[..., :bottom, :], x[..., rows - top:, :]], dim=-2)
        if state.synchronous:
            pieces = state.gather(self.key, piece)
        else:
            pieces = state.stale(self.key, piece)
        parts = []
        if top:
            halo = pieces[me - 1][..., bottom:, :] if above else x.new_zeros(
                (*x.shape[:-2], top, x.shape[-1]))
            parts.append(halo)
        parts.append(x if self.bottom >= 0 else x[..., : rows + self.bottom, :])
        if bottom:
            halo = pieces[me + 1][..., :bottom, :] if below else x.new_zeros(
                (*x.shape[:-2], bottom, x.shape[-1]))
            parts.append(halo)
        extended = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        out = F.conv2d(extended, conv.weight, conv.bias, conv.stride, (0, int(conv.padding[1])),
                       conv.dilation, conv.groups)
        if not state.synchronous:
            state.publish(self.key, piece)
        return out
