"""The parts every replicated-model strategy shares (the Protocol is paraflow.plugin.Strategy)."""

from __future__ import annotations

from typing import Any

import torch

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.outputs import OutputSink
from paraflow.plugin import StrategyBase


class ReplicatedModel(StrategyBase):
    """Every rank holds the whole model unchanged; images gathered to every rank by index."""

    name = "replicated"

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return list(range(n_images))

    def decode_in_bands(self, vae: Any, latents: torch.Tensor,
                        ctx: ParallelContext) -> torch.Tensor:
        from paraflow.strategies.patch.vae import patch_decode

        return patch_decode(vae, latents, self.image_comm(ctx))

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink:
        return gather_by_index(sink, ctx.comm, ctx.device)


def gather_by_index(sink: OutputSink, comm: Communicator, device: torch.device) -> OutputSink:
    """All-gather the (uneven) per-rank results over `comm`; ranks that made the same index
    agree."""
    if comm.world_size == 1:
        return sink
    ids = sorted(sink.images)
    all_ids = comm.all_gather_uneven(torch.tensor(ids, dtype=torch.int64, device=device))
    images = torch.from_numpy(sink.stacked_images(ids)).to(device)
    all_images = comm.all_gather_uneven(images)
    gathered = OutputSink(sink.image_shape, sink.latent_shape, sink.keep_latents)
    for rank_ids, rank_images in zip(all_ids, all_images):
        for row, image_id in enumerate(rank_ids.tolist()):
            gathered.images[image_id] = rank_images[row].cpu().numpy()
    if sink.keep_latents:
        lat = sink.stacked_latents(ids).to(device)
        for rank_ids, rank_lat in zip(all_ids, comm.all_gather_uneven(lat)):
            for row, image_id in enumerate(rank_ids.tolist()):
                gathered.latents[image_id] = rank_lat[row].cpu()
    return gathered
