"""BandPatchEmbed: a diffusion transformer's patch embedding on this rank's band of rows.

Split: the latent rows (each rank its band, whole token rows). Communicated: nothing — a patch
reads only its own latent rows; the positional embedding is the whole image's, cut at the band's
token rows, so every token carries its true position.
"""

from __future__ import annotations

import torch
from torch import nn

from paraflow.adapters import band_patch_embed
from paraflow.strategies.patch.state import PatchState


class BandPatchEmbed(nn.Module):
    def __init__(self, embed: nn.Module, state: PatchState) -> None:
        super().__init__()
        self.embed, self.state = embed, state

    def forward(self, band: torch.Tensor) -> torch.Tensor:
        plan = self.state.band
        return band_patch_embed(self.embed, band, sum(plan.sizes), plan.start)
