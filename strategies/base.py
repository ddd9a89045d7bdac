"""The strategy Protocol and the parts every replicated-model strategy shares."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from paraflow.context import ParallelContext
from paraflow.outputs import OutputSink


@runtime_checkable
class Strategy(Protocol):
    """How a run is laid out over the ranks.

    setup: build groups and buffers from the context, before the model is touched.
    parallelize: swap or shard modules of the pipeline in place (the model code is not forked).
    assign_images: which global image indices this rank pushes through the stage graph.
    gather: collect every rank's outputs; the result matters on rank 0 only, which writes.
    on_step: called by the denoising loop before each step (displaced patch needs the counter).
    """

    name: str

    def setup(self, ctx: ParallelContext) -> None: ...

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None: ...

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]: ...

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink: ...

    def on_step(self, step: int, ctx: ParallelContext) -> None: ...


class ReplicatedModel:
    """Every rank holds the whole model unchanged; images gathered to every rank by index."""

    name = "replicated"

    def setup(self, ctx: ParallelContext) -> None:
        return None

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        return None

    def on_step(self, step: int, ctx: ParallelContext) -> None:
        return None

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return list(range(n_images))

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink:
        """All-gather the (uneven) per-rank results; ranks that made the same index agree."""
        if ctx.world_size == 1:
            return sink
        comm, ids = ctx.comm, sorted(sink.images)
        id_tensor = torch.tensor(ids, dtype=torch.int64, device=ctx.device)
        all_ids = comm.all_gather_uneven(id_tensor)
        images = torch.from_numpy(sink.stacked_images(ids)).to(ctx.device)
        all_images = comm.all_gather_uneven(images)
        gathered = OutputSink(sink.image_shape, sink.latent_shape, sink.keep_latents)
        for rank_ids, rank_images in zip(all_ids, all_images):
            for row, image_id in enumerate(rank_ids.tolist()):
                gathered.images[image_id] = rank_images[row].cpu().numpy()
        if sink.keep_latents:
            lat = sink.stacked_latents(ids).to(ctx.device)
            for rank_ids, rank_lat in zip(all_ids, comm.all_gather_uneven(lat)):
                for row, image_id in enumerate(rank_ids.tolist()):
                    gathered.latents[image_id] = rank_lat[row].cpu()
        return gathered

