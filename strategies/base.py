"""The parts every replicated-model strategy shares (the Protocol is paraflow.plugin.Strategy)."""

from __future__ import annotations

from typing import Any

import torch

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.plugin import StrategyBase


class ReplicatedModel(StrategyBase):
    """Every rank holds the whole model unchanged; images gathered to every rank by index
    (StrategyBase.gather over the whole world); the VAE in bands over image_comm (BandedVAE)
    where the ranks hold the same latents."""

    name = "replicated"

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return list(range(n_images))

    def image_comm(self, ctx: ParallelContext) -> Communicator:
        """The ranks that hold the same image (BandedVAE): all of them, by default."""
        return ctx.comm

    def decode_in_bands(self, vae: Any, latents: torch.Tensor,
                        ctx: ParallelContext) -> torch.Tensor:
        from paraflow.strategies.patch.vae import patch_decode

        return patch_decode(vae, latents, self.image_comm(ctx))


    def encode_in_bands(self, vae: Any, pixels: torch.Tensor,
                        ctx: ParallelContext) -> torch.Tensor:
        from paraflow.strategies.patch.vae import patch_encode

        return patch_encode(vae, pixels, self.image_comm(ctx))
