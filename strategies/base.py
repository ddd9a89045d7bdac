"""The strategy Protocol and the parts every replicated-model strategy shares."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.mesh import Layout
from paraflow.outputs import OutputSink


@runtime_checkable
class Strategy(Protocol):
    """How a run is laid out over the ranks.

    setup: build groups and buffers from the context, before the model is touched.
    parallelize: swap or shard modules of the pipeline in place (the model code is not forked).
    assign_images: which global image indices this rank pushes through the stage graph.
    gather: collect every rank's outputs; the result matters on rank 0 only, which writes.
    on_step: called by the denoising loop before each step (displaced patch needs the counter).
    mesh_layout (optional): the named mesh dimensions for a world size (paraflow/mesh.py); the
        launcher builds ctx.mesh from it.
    on_denoise_end (optional): called once the denoising loop is done, before decode.
    validate (optional): checks of the config before any rank starts.
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

    def mesh_layout(self, world_size: int) -> Layout | None:
        return None  # no named dimensions

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
