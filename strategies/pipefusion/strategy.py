"""PipeFusion (Wang et al. 2024, arXiv 2405.14430): the transformer's blocks in N consecutive
stages, one per rank of an image (each rank holds 1/N of the blocks), the image in M patches
that flow through the stages as a pipeline; after `warmup_steps` synchronous whole-image steps
each patch attends to its own fresh keys/values and the other patches' displaced ones
(stages.py: the split; pipeline.py: the patches; state.py: the buffer; attention.py).

With `cfg_split` and `data_degree` the ranks form the mesh data × cfg × stage (paraflow/mesh.py):
each data replica makes its block of the images, each guidance half of it runs its own
pipeline. Every rank of a replica holds the whole latent (the last stage's prediction is
broadcast), so the scheduler, the VAE in bands and the gather are the patch strategies'.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks import HookRegistry
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
from paraflow.outputs import OutputSink
from paraflow.strategies.base import ReplicatedModel
from paraflow.strategies.patch.layers import place_patch_embedding
from paraflow.strategies.pipefusion.attention import install_processors
from paraflow.strategies.pipefusion.checks import check_config, check_model
from paraflow.strategies.pipefusion.pipeline import PatchPipeline
from paraflow.strategies.pipefusion.stages import HOOK, keep_stage
from paraflow.strategies.pipefusion.state import PipeState
from paraflow.strategies.replicas import DataReplicas


class PipeFusion(ReplicatedModel):
    name = "pipefusion"
    replicated_latents = True  # every rank of a replica holds the whole latent

    def __init__(self, cfg_split: bool = False, data_degree: int = 1, warmup_steps: int = 1,
                 patches: int | None = None) -> None:
        self.cfg_split, self.data_degree = bool(cfg_split), int(data_degree)
        self.warmup_steps = int(warmup_steps)
        self.patches = None if patches is None else int(patches)
        self.state: PipeState | None = None
        self.parts, self.part = 1, 0
        self.cfg_comm: Communicator | None = None
        self._image_comm: Communicator | None = None
        self.replicas = DataReplicas()

    @property
    def mode(self) -> str:
        patches = "stages" if self.patches is None else self.patches
        return layout_label(f"{self.name} warmup_steps={self.warmup_steps}, patches={patches}",
                            self.cfg_split, self.data_degree)

    def mesh_layout(self, world_size: int) -> Layout:
        return hybrid_layout(world_size, self.data_degree, self.cfg_split, "stage")

    def validate(self, cfg: DictConfig) -> None:
        """Checks before any rank starts: the mesh, the options, the model's blocks and rows."""
        if self.cfg_split:
            check_cfg_split(cfg)
        stages = self.mesh_layout(world_of(cfg))["stage"]
        check_config(cfg, self.warmup_steps, self.patches)
        check_model(cfg, stages, self.patch_count(stages))

    def patch_count(self, stages: int) -> int:
        return self.patches if self.patches is not None else stages

    def setup(self, ctx: ParallelContext) -> None:
        mesh = mesh_of(ctx, self.mesh_layout(ctx.world_size))
        if mesh is None:  # one rank: one stage
            stage_comm = replica = self.cfg_comm = ctx.comm
        else:
            replica = replica_comm(ctx, mesh)
            stage_comm = dim_comm(ctx, mesh, "stage")
            self.cfg_comm = dim_comm(ctx, mesh, "cfg")
            self.parts, self.part = self.cfg_comm.world_size, self.cfg_comm.rank
        self.replicas = DataReplicas.of(ctx, mesh)
        self._image_comm = replica
        self.state = PipeState(stage_comm, warmup_steps=self.warmup_steps)

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        state = self.state
        if state is None or self.cfg_comm is None:
            raise RuntimeError("setup() must run before parallelize()")
        call = denoiser_call(pipe)
        model, family = call.model, call.family
        blocks = len(family.cache_blocks(model))
        if blocks < state.stages:  # the pre-launch check could not see the model
            raise ParaflowError(f"strategy pipefusion: {state.stages} stages but the denoiser "
                                f"{type(model).__name__} has {blocks} transformer blocks")
        if state.stages > 1:
            keep_stage(model, family, state, state.stage, state.stages)
        place_patch_embedding(model, family, state)  # a patch's tokens at their true rows
        install_processors(model, family, state)
        hook = PatchPipeline(state, self.patch_count(state.stages),
                             family.downsampling(model.config), self.parts, self.part,
                             self.cfg_comm)
        HookRegistry.check_if_exists_or_initialize(call).register_hook(hook, HOOK)

    def on_step(self, step: int, ctx: ParallelContext) -> None:
        if self.state is not None:
            self.state.begin_step(step)

    def on_denoise_end(self, ctx: ParallelContext) -> None:
        if self.state is not None:
            self.state.reset()

    def image_comm(self, ctx: ParallelContext) -> Communicator:
        return self._image_comm or ctx.comm

    def shared_image_comm(self, ctx: ParallelContext) -> Communicator | None:
        return self.image_comm(ctx)

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return self.replicas.assign(n_images)

    def result_comm(self, ctx: ParallelContext) -> Communicator | None:
        return self.replicas.result_comm()

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink:
        if self.state is not None:
            self.state.end_step()
        return super().gather(sink, ctx)

    def exact_twin(self, cfg: DictConfig) -> list[str] | None:
        """Itself with every step a warm-up (exact: parity's drift reference)."""
        return ["+strategy=pipefusion", f"strategy.warmup_steps={int(cfg.steps)}",
                f"strategy.cfg_split={self.cfg_split}", f"strategy.data_degree={self.data_degree}"]

    def distinct_steps(self, steps: int) -> list[int]:
        """The last warm-up step and the first with patches."""
        last_warm = min(self.warmup_steps, steps) - 1
        return [last_warm] + ([last_warm + 1] if last_warm + 1 < steps else [])
