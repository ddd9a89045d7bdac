"""What every patch-parallel strategy shares: one image cut into bands of rows over the ranks
(optionally after splitting the guidance batch over two halves of the ranks), every rank making
every image, rank 0 writing."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.outputs import OutputSink
from paraflow.validate import model_factor
from strategies.base import ReplicatedModel
from strategies.patch.adapter import configured_downsampling, unet_downsampling
from strategies.patch.bands import check_layout
from strategies.patch.layers import swap_patch_layers
from strategies.patch.state import GroupNormMode, PatchState
from strategies.patch.unet import Layout, PatchUNetHooks


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
    replicated_latents = True  # every rank holds the whole latent (patch VAE decode relies on it)

    def __init__(self, cfg_split: bool = False, warmup_steps: int = 0, displaced: bool = False,
                 groupnorm: str = "corrected_async", frozen: bool = False,
                 bucket_mb: float = 4.0) -> None:
        self.cfg_split = bool(cfg_split)
        self.displaced, self.warmup_steps, self.frozen = displaced, int(warmup_steps), frozen
        self.groupnorm = GroupNormMode(groupnorm)
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.state: PatchState | None = None
        self.layout: Layout | None = None

    @property
    def mode(self) -> str:
        """A label for messages and run records."""
        parts = [self.name]
        if self.displaced:
            parts.append(f"groupnorm={self.groupnorm.value}, warmup_steps={self.warmup_steps}"
                         + (", frozen" if self.frozen else ""))
        if self.cfg_split:
            parts.append("cfg_split")
        return " ".join(parts)

    def validate(self, cfg: DictConfig) -> None:
        """Checks before any rank starts: guidance split needs, band thickness."""
        world_size = int(cfg.launcher.devices) * int(cfg.launcher.num_nodes)
        if self.cfg_split:
            if world_size < 2:
                raise ParaflowError("strategy.cfg_split=true needs at least 2 ranks "
                                    f"(launcher.devices={world_size})")
            if float(cfg.guidance_scale) <= 1.0:
                raise ParaflowError(f"strategy.cfg_split=true splits the two guidance branches "
                                    f"but guidance_scale={cfg.guidance_scale} turns guidance off;"
                                    " use guidance_scale > 1 or cfg_split=false")
        if self.warmup_steps < 0:
            raise ParaflowError(f"strategy.warmup_steps={self.warmup_steps}: must be >= 0")
        unit = configured_downsampling(cfg.model)
        if unit is not None:
            bands = max(len(g) for g in batch_groups(world_size, self.cfg_split))
            check_layout(int(cfg.height), model_factor(cfg.model), bands, unit)

    def setup(self, ctx: ParallelContext) -> None:
        groups = batch_groups(ctx.world_size, self.cfg_split)
        band_comm = ctx.comm.split(groups)
        self.state = PatchState(band_comm, displaced=self.displaced,
                                warmup_steps=self.warmup_steps, frozen=self.frozen,
                                groupnorm=self.groupnorm, bucket_bytes=self.bucket_bytes)
        self.layout = Layout(ctx.comm, groups, 1)

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        if self.state is None or self.layout is None:
            raise RuntimeError("setup() must run before parallelize()")
        self.layout.unit = unet_downsampling(pipe.unet)
        if self.exchange and self.state.comm.world_size > 1:
            swap_patch_layers(pipe.unet, self.state)
        PatchUNetHooks(self.state, self.layout).install(pipe.unet)

    def on_step(self, step: int, ctx: ParallelContext) -> None:
        if self.state is not None:
            self.state.begin_step(step)

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return list(range(n_images))  # every rank works on every image

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink:
        """Every rank already holds every image: wait for stray transfers, rank 0 writes."""
        if self.state is not None:
            self.state.drain()
        return sink
