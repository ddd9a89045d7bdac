"""What core needs from a strategy plugin, and the defaults a plugin inherits.

A strategy is found by name in the entry-point group `paraflow.strategies` (name → class); its
config schema and default config are put in Hydra's ConfigStore by a function in the group
`paraflow.configs` (`register(store)`: e.g. `store.store(group="strategy", name=NAME,
node=SchemaDataclass)`), so `+strategy=NAME` composes, is checked against the schema and builds
the class, for a plugin from another package exactly as for the
built-in ones. Core calls strategies only through `Strategy`; `StrategyBase` gives every
optional hook its do-nothing default; the optional parts (the VAE in bands, planning, parity)
are protocols of their own, asked for through banded_vae / planned / parity_reference.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from paraflow.comm import Communicator
    from paraflow.context import ParallelContext
    from paraflow.mesh import Layout
    from paraflow.outputs import OutputSink

@runtime_checkable
class Strategy(Protocol):
    """What a run needs of a strategy: how it is laid over the ranks.

    validate: checks of the config before any rank starts (raise ParaflowError).
    mesh_layout: the named mesh dimensions for a world size, or None; the launcher builds
        ctx.mesh from it and run.json records it.
    setup: build groups and buffers from the context, before the model is touched.
    parallelize: swap or shard modules of the pipeline in place (the model code is not forked).
    assign_images: which global image indices this rank pushes through the stage graph.
    on_step: called by the denoising loop before each step (displaced patch needs the counter).
    on_denoise_end: called once the denoising loop is done, before decode.
    result_comm: the ranks this rank's images are gathered over, by index (None: it takes part
        in no gather); the default `gather` runs over it and the planner sizes it from it.
    gather: collect every rank's outputs; the result matters on rank 0 only, which writes.

    Optional parts, each its own protocol below, with defaults where a strategy lacks them:
    BandedVAE (the VAE in bands), Planned (the planner), ParityReference (the parity tool).
    """

    name: str
    replicated_latents: bool

    @property
    def mode(self) -> str: ...

    def validate(self, cfg: DictConfig) -> None: ...

    def mesh_layout(self, world_size: int) -> Layout | None: ...

    def setup(self, ctx: ParallelContext) -> None: ...

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None: ...

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]: ...

    def on_step(self, step: int, ctx: ParallelContext) -> None: ...

    def on_denoise_end(self, ctx: ParallelContext) -> None: ...

    def result_comm(self, ctx: ParallelContext) -> Communicator | None: ...

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink: ...


@runtime_checkable
class BandedVAE(Protocol):
    """The VAE with the image's rows split over `image_comm` (the ranks holding the same image);
    called only when the strategy has `replicated_latents` (every rank of image_comm holds the
    same latents). decode_in_bands: latents → pixels; encode_in_bands: pixels → the posterior's
    parameters, the whole latent on every rank (img2img, inpaint)."""

    def image_comm(self, ctx: ParallelContext) -> Communicator: ...

    def decode_in_bands(self, vae: Any, latents: torch.Tensor,
                        ctx: ParallelContext) -> torch.Tensor: ...

    def encode_in_bands(self, vae: Any, pixels: torch.Tensor,
                        ctx: ParallelContext) -> torch.Tensor: ...


@runtime_checkable
class Planned(Protocol):
    """For the planner (paraflow/plan), which runs setup, parallelize and the steps of every
    rank on meta tensors over collectives that move nothing.

    describe: this rank's place in the run, in a few words (after setup).
    alike_key: ranks with equal keys (and equal image counts) use the same memory and send the
        same bytes, so one of them is replayed for all; None: replay this rank on its own.
    distinct_steps: of `steps` denoising steps, those whose work differs; each step not listed
        costs what the last listed step before it costs (the first listed, before that).
    """

    def describe(self, cfg: DictConfig, ctx: ParallelContext) -> str: ...

    def alike_key(self, cfg: DictConfig, ctx: ParallelContext) -> Hashable | None: ...

    def distinct_steps(self, steps: int) -> list[int]: ...


@runtime_checkable
class ParityReference(Protocol):
    """For the parity tool: exact_twin — overrides of the exact strategy on the same layout
    (the drift reference), or None; band_rows — latent rows of each band of one image (the
    seam score), or None."""

    def exact_twin(self, cfg: DictConfig) -> list[str] | None: ...

    def band_rows(self, cfg: DictConfig) -> list[int] | None: ...


@runtime_checkable
class PlanNotes(Protocol):
    """For the planner: lines of the strategy's own figures beyond the plan's table (patch
    strategies: sharded weights)."""

    def plan_notes(self, cfg: DictConfig) -> list[str]: ...


def plan_notes(strategy: Strategy, cfg: DictConfig) -> list[str]:
    """The strategy's own lines for the plan, if it has any."""
    return list(strategy.plan_notes(cfg)) if isinstance(strategy, PlanNotes) else []


def image_ranks(strategy: Strategy, ctx: ParallelContext) -> Communicator | None:
    """The ranks that work on the same images as this one (StrategyBase.shared_image_comm);
    None where this rank's images are its own."""
    shared = getattr(strategy, "shared_image_comm", None)
    return shared(ctx) if shared is not None else None


def banded_vae(strategy: Strategy) -> BandedVAE | None:
    """The strategy's VAE in bands, if it has one."""
    return strategy if isinstance(strategy, BandedVAE) else None


def planned(strategy: Strategy) -> Planned:
    """The strategy's planning part, or StrategyBase's defaults (every rank and step alike)."""
    if isinstance(strategy, Planned):
        return strategy
    defaults = PlannedDefaults()
    defaults.name = strategy.name
    return defaults


def parity_reference(strategy: Strategy) -> ParityReference:
    """The strategy's parity part, or none (no twin, no bands)."""
    if isinstance(strategy, ParityReference):
        return strategy
    return NoParity()


class PlannedDefaults:
    """Planned's defaults: every rank and every step planned on its own."""

    name: str = "strategy"

    def describe(self, cfg: DictConfig, ctx: ParallelContext) -> str:
        return f"{self.name} rank {ctx.rank}/{ctx.world_size}"

    def alike_key(self, cfg: DictConfig, ctx: ParallelContext) -> Hashable | None:
        return None

    def distinct_steps(self, steps: int) -> list[int]:
        return [0]


class NoParity:
    """ParityReference's defaults: no exact twin, no bands."""

    def exact_twin(self, cfg: DictConfig) -> list[str] | None:
        return None

    def band_rows(self, cfg: DictConfig) -> list[int] | None:
        return None


class StrategyBase(PlannedDefaults, NoParity):
    """Defaults for every member of Strategy and its optional parts but assign_images: no
    checks, no mesh, no set-up, nothing swapped, no per-step work, the images gathered over the
    whole world by index, every rank and every step planned on its own, no VAE in bands."""

    name = "base"
    replicated_latents = False  # set when every rank holds the whole latent of its images

    def shared_image_comm(self, ctx: ParallelContext) -> Communicator | None:
        """The ranks that work on the same images with this one: a step cache decides over
        them (paraflow/cache). None: this rank's images are its own (data replicas)."""
        return None

    @property
    def mode(self) -> str:
        """A label for messages and run records (options included where they matter)."""
        return self.name

    def validate(self, cfg: DictConfig) -> None:
        return None

    def mesh_layout(self, world_size: int) -> Layout | None:
        return None

    def setup(self, ctx: ParallelContext) -> None:
        return None

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        return None

    def on_step(self, step: int, ctx: ParallelContext) -> None:
        return None

    def on_denoise_end(self, ctx: ParallelContext) -> None:
        return None

    def result_comm(self, ctx: ParallelContext) -> Communicator | None:
        return ctx.comm

    def gather(self, sink: OutputSink, ctx: ParallelContext) -> OutputSink:
        from paraflow.outputs import gather_by_index

        comm = self.result_comm(ctx)
        return sink if comm is None else gather_by_index(sink, comm, ctx.device)
