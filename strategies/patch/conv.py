"""PatchConv2d: a k×k convolution on this rank's band of rows.

Split: the input rows (each rank its band). Communicated: the halo rows the kernel reaches into
the neighbouring bands — each rank all-gathers its top `bottom` and bottom `top` rows, fresh
(synchronous steps) or from the previous step (displaced steps). A convolution whose input every
rank holds whole (`replicated`: the UNet's conv_in on the latent) slices its halo from that input
instead: exact at every step, nothing sent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paraflow.errors import ParaflowError
from paraflow.strategies.patch.bands import conv_halo, conv_keeps_bands, halo_sources
from paraflow.strategies.patch.state import PatchState


class PatchConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, state: PatchState, key: str,
                 replicated: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ParaflowError(f"{key}: patch convolution supports zero padding given as "
                                f"numbers, not {conv.padding_mode!r} / {conv.padding!r}")
        self.conv, self.state, self.key, self.replicated = conv, state, key, replicated
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        padding, dilation = int(conv.padding[0]), conv.dilation[0]
        self.geometry = (kernel, stride, padding, dilation)
        self.top, self.bottom = conv_halo(kernel, stride, padding, dilation)

    # The wrapped convolution's parameters, for code that reads them off the layer (peft's LoRA
    # convolution casts its input to its down factor's weight dtype).
    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        sizes = state.band.scaled(x.shape[-2])
        if not conv_keeps_bands(sum(sizes), *self.geometry):
            raise ParaflowError(f"{self.key}: a {self.geometry} convolution over {sum(sizes)} "
                                "rows does not map bands to bands")
        if self.replicated:
            return self._conv(self._rows_of_whole_input(x))
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
        out = self._conv(extended)
        if not state.synchronous:
            state.publish(self.key, piece)
        return out

    def _conv(self, extended: torch.Tensor) -> torch.Tensor:
        """The convolution of a band already extended by its halo rows (no row padding)."""
        conv = self.conv
        return F.conv2d(extended, conv.weight, conv.bias, conv.stride, (0, int(conv.padding[1])),
                        conv.dilation, conv.groups)

    def _rows_of_whole_input(self, x: torch.Tensor) -> torch.Tensor:
        """This band with its halo rows cut from the whole input; zeros beyond the image."""
        whole, plan = self.state.whole_input, self.state.band
        if whole is None or whole.shape[-2] != sum(plan.sizes) or whole.shape[0] != x.shape[0]:
            raise RuntimeError(f"{self.key}: replicated-input convolution called without the "
                               "model's whole input")
        first, last = plan.start - self.top, plan.stop + self.bottom
        rows = whole.shape[-2]
        cut = whole[..., max(first, 0):min(last, rows), :]
        return F.pad(cut, (0, 0, max(-first, 0), max(last - rows, 0)))
