"""What every patch-parallel strategy shares: one image cut into bands of rows over the ranks
(optionally after splitting the guidance batch over two halves of the ranks), every rank making
every image, rank 0 writing. With `data_degree` > 1 the ranks form data replicas first (mesh
data × cfg × patch, paraflow/mesh.py): each replica makes its block of the images this way."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from omegaconf import DictConfig

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.families import denoiser_call
from paraflow.mesh import (
    Layout,
    check_cfg_split,
    dim_comm,
    hybrid_layout,
    layout_label,
    mesh_of,
    replica_comm,
    world_of,
)
from paraflow.models.configured import configured_downsampling
from paraflow.outputs import OutputSink
from paraflow.strategies.base import ReplicatedModel
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor
from paraflow.strategies.patch.bands import band_sizes, check_layout
from paraflow.strategies.patch.denoiser import BandLayout, PatchDenoiserHooks
from paraflow.strategies.patch.layers import place_patch_embedding, swap_patch_layers
from paraflow.strategies.patch.shard import check_sharding, plan_note, shard_pipeline
from paraflow.strategies.patch.state import GroupNormMode, PatchState
from paraflow.strategies.replicas import DataReplicas
from paraflow.validate import model_factor


def batch_groups(world_size: int, cfg_split: bool) -> list[list[int]]:
    """The ranks of each batch part: all together, or the guidance split's two halves (the
    second half larger by one on an odd number of ranks)."""
    ranks = list(range(world_size))
    if not cfg_split or world_size < 2:
        return [ranks]
    return [ranks[: world_size // 2], ranks[world_size // 2:]]


class PatchParallel(ReplicatedModel):
    """Base of naive_patch, sync_patch and displaced_patch. Subclasses set `exchange` (whether
    layers communicate) and the displaced options."""

    name = "patch"
    exchange = True
    # the self-attention processor of a band: (state, layer name) → processor
    attention_processor: Callable[..., Any] = PatchSelfAttnProcessor
    replicated_latents = True  # every rank holds the whole latent (patch VAE decode relies on it)

    def __init__(self, cfg_split: bool = False, warmup_steps: int = 0, displaced: bool = False,
                 groupnorm: str = "corrected_async", frozen: bool = False,
                 bucket_mb: float = 4.0, data_degree: int = 1,
                 shard_weights: bool = False) -> None:
        self.cfg_split, self.data_degree = bool(cfg_split), int(data_degree)
        self.shard_weights = bool(shard_weights)
        self.displaced, self.warmup_steps, self.frozen = displaced, int(warmup_steps), frozen
        self.groupnorm = GroupNormMode(groupnorm)
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.state: PatchState | None = None
        self.layout: BandLayout | None = None
        self._image_comm: Communicator | None = None  # the ranks sharing an image
        self.replicas = DataReplicas()

    @property
    def mode(self) -> str:
        """A label for messages and run records."""
        name = self.name
        if self.displaced:
            name += (f" groupnorm={self.groupnorm.value}, warmup_steps={self.warmup_steps}"
                     + (", frozen" if self.frozen else ""))
        return layout_label(name, self.cfg_split, self.data_degree)

    def mesh_layout(self, world_size: int) -> Layout | None:
        """data × cfg × patch; None for one replica with uneven guidance halves (an odd rank
        count), which no grid expresses and which earlier versions allowed."""
        if self.cfg_split and self.data_degree == 1 and world_size % 2:
            return None
        return hybrid_layout(world_size, self.data_degree, self.cfg_split, "patch",
                             uneven_cfg=True)

    def validate(self, cfg: DictConfig) -> None:
        """Checks before any rank starts: guidance split needs, the mesh, band thickness."""
        world_size = world_of(cfg)
        if self.cfg_split:
            check_cfg_split(cfg)
        self.mesh_layout(world_size)  # raises on a layout no mesh expresses
        if self.shard_weights:
            check_sharding(cfg)
        if self.warmup_steps < 0:
            raise ParaflowError(f"strategy.warmup_steps={self.warmup_steps}: must be >= 0")
        unit = configured_downsampling(cfg.model)
        if unit is not None:
            check_layout(int(cfg.height), model_factor(cfg.model), self.band_count(cfg), unit)

    def band_count(self, cfg: DictConfig) -> int:
        """The bands one image is cut into (the most, with uneven guidance halves)."""
        world = world_of(cfg)
        layout = self.mesh_layout(world)
        return (layout["patch"] if layout is not None
                else max(len(g) for g in batch_groups(world, self.cfg_split)))

    def setup(self, ctx: ParallelContext) -> None:
        mesh = mesh_of(ctx, self.mesh_layout(ctx.world_size))
        if mesh is None:  # one rank, or uneven guidance halves: bands from the world's ranks
            replica = ctx.comm
            groups = batch_groups(ctx.world_size, self.cfg_split)
            band_comm = ctx.comm.split(groups)
        else:  # replica-local ranks run row-major over (cfg, patch), as batch_groups lays out
            replica = replica_comm(ctx, mesh)
            groups = batch_groups(replica.world_size, self.cfg_split)
            band_comm = dim_comm(ctx, mesh, "patch")
        self.replicas = DataReplicas.of(ctx, mesh)
        self._image_comm = replica
        self.state = PatchState(band_comm, displaced=self.displaced,
                                warmup_steps=self.warmup_steps, frozen=self.frozen,
                                groupnorm=self.groupnorm, bucket_bytes=self.bucket_bytes)
        self.layout = BandLayout(replica, groups, 1)

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        if self.state is None or self.layout is None:
            raise RuntimeError("setup() must run before parallelize()")
        call = denoiser_call(pipe)
        model, family = call.model, call.family
        self.layout.unit = family.downsampling(model.config)
        if self.state.comm.world_size > 1:
            if self.exchange:
                swap_patch_layers(model, self.state,
                                  replicated=family.replicated_input_convs(model),
                                  attention=self.attention_processor, family=family)
            else:  # bands attend only to themselves, but every token keeps its true position
                place_patch_embedding(model, family, self.state)
        PatchDenoiserHooks(self.state, self.layout).install(call)
        if self.shard_weights:  # after the swaps: the patch layers hold the weights now
            shard_pipeline(pipe, model, family.compile_regions(model), self.state.comm,
                           ctx.device)

    def plan_notes(self, cfg: DictConfig) -> list[str]:
        """The planner's line on sharded weights (strategies/patch/shard.py)."""
        bands = self.band_count(cfg)
        return [plan_note(cfg, bands)] if self.shard_weights and bands > 1 else []

    def image_comm(self, ctx: ParallelContext) -> Communicator:
        """A data replica's ranks in hybrid layouts, else all."""
        return self._image_comm or ctx.comm

    def shared_image_comm(self, ctx: ParallelContext) -> Communicator | None:
        return self.image_comm(ctx)  # the bands of one image

    def exact_twin(self, cfg: DictConfig) -> list[str] | None:
        """sync_patch on the same layout (exact: parity's drift reference)."""
        return ["+strategy=sync_patch", f"strategy.cfg_split={self.cfg_split}",
                f"strategy.data_degree={self.data_degree}"]

    def band_rows(self, cfg: DictConfig) -> list[int] | None:
        """Latent rows of each band of one image, as setup() and the UNet hooks cut them."""
        unit = configured_downsampling(cfg.model) or 1
        return band_sizes(int(cfg.height) // model_factor(cfg.model), self.band_count(cfg),
                          unit)

    def on_step(self, step: int, ctx: ParallelContext) -> None:
        if self.state is not None:
            self.state.begin_step(step)

    def on_denoise_end(self, ctx: ParallelContext) -> None:
        """Nothing reads the displaced buffers after the last step: wait for the transfers in
        flight and drop them all, so they do not sit beside the decode (the memory peak)."""
        if self.state is not None:
            self.state.drain()
            self.state.previous.clear()

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return self.replicas.assign(n_images)  # every rank of a replica works on its images

    def result_comm(self, ctx: ParallelContext) -> Communicator | None:
        return self.replicas.result_comm()

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink:
        """Wait for stray transfers; the replicas' images to rank 0, which writes."""
        if self.state is not None:
            self.state.drain()
        return super().gather(sink, ctx)

    def _place(self, cfg: DictConfig) -> tuple[int, int, list[list[int]], int]:
        """(guidance part, band, the parts' rank groups, the band's latent rows), after setup."""
        if self.state is None or self.layout is None or self._image_comm is None:
            raise RuntimeError("setup() must run first")
        groups, local = self.layout.groups, self._image_comm.rank
        part = next(i for i, g in enumerate(groups) if local in g)
        band, bands = self.state.comm.rank, self.state.comm.world_size
        rows = band_sizes(int(cfg.height) // model_factor(cfg.model), bands,
                          configured_downsampling(cfg.model) or 1)[band]
        return part, band, groups, rows

    def describe(self, cfg: DictConfig, ctx: ParallelContext) -> str:
        part, band, groups, rows = self._place(cfg)
        where = self.replicas.label() + (f"cfg {part} · " if len(groups) > 1 else "")
        return f"{where}band {band}/{len(groups[part])} ({rows} latent rows)"

    def alike_key(self, cfg: DictConfig, ctx: ParallelContext) -> Hashable | None:
        """Bands of equal height in parts of equal size do the same work (edge halos aside:
        every rank sends pieces of the same, padded shape); with sharded weights, at the same
        place in their group."""
        part, band, groups, rows = self._place(cfg)
        # sharded weights: a band's chunks differ in size where a dim 0 does not divide evenly
        chunk = band if self.shard_weights else None
        return rows, len(groups[part]), tuple(len(g) for g in groups), chunk

    def distinct_steps(self, steps: int) -> list[int]:
        """Displaced: the last synchronous step (it keeps the other bands' pieces) and the first
        displaced one (stale buffers plus buckets in flight); else every step alike."""
        if not self.displaced:
            return [0]
        last_sync = min(self.warmup_steps, steps - 1)
        return [last_sync] + ([last_sync + 1] if last_sync + 1 < steps else [])
