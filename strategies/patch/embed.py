"""BandPatchEmbed: a diffusion transformer's patch embedding on this rank's band of rows.

Split: the latent rows (each rank its band, whole token rows). Communicated: nothing — a patch
reads only its own latent rows; the positions are the whole image's, at the band's token rows
(the family's band_patch_embed), so every token carries its true position.
"""

from __future__ import annotations

import torch
from torch import nn

from paraflow.families.base import Family
from paraflow.strategies.patch.state import PatchState


class BandPatchEmbed(nn.Module):
    def __init__(self, embed: nn.Module, state: PatchState, family: Family) -> None:
        super().__init__()
        self.embed, self.state, self.family = embed, state, family

    def forward(self, band: torch.Tensor) -> torch.Tensor:
        plan = self.state.band
        return self.family.band_patch_embed(self.embed, band, sum(plan.sizes), plan.start)
