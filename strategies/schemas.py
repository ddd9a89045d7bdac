"""The built-in strategies' config schemas (dataclasses only: imported when configs compose,
before torch loads). Registered through the entry-point group `paraflow.configs`, as an outside
plugin registers its own; conf/strategy/*.yaml name them in their defaults lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING


class GroupNormMode(str, Enum):
    """GroupNorm statistics after warm-up in displaced patch parallelism."""

    corrected_async = "corrected_async"  # the paper: previous global + (fresh − previous) own
    weighted = "weighted"  # the other bands' previous sums with this band's fresh ones
    stale = "stale"  # the previous step's global statistics
    sync = "sync"  # fresh global statistics every step (an all-gather per GroupNorm)
    separate = "separate"  # this band's statistics only


@dataclass
class StrategyConfig:
    name: str = MISSING  # the entry point (group paraflow.strategies) that builds it


class TensorStyle(str, Enum):
    """How strategy=tensor splits one module (see strategies/tensor.py)."""

    colwise = "colwise"  # linear by output features
    colwise_gated = "colwise_gated"  # gated linear (GEGLU) by output features, halves kept paired
    colwise_gather = "colwise_gather"  # linear by output features, its output all-gathered
    rowwise = "rowwise"  # linear by input features; its output all-reduced
    rowwise_concat = "rowwise_concat"  # rowwise over cat([x, y]), x as wide as the output
    heads = "heads"  # attention module: told it has heads/N heads
    conv_out = "conv_out"  # conv by output channels
    conv_in = "conv_in"  # conv by input channels; its output all-reduced
    groupnorm = "groupnorm"  # GroupNorm along whole groups


@dataclass
class MeshStrategyConfig(StrategyConfig):
    """Strategies laid out on the data × cfg × inner mesh (paraflow/mesh.py)."""

    data_degree: int = 1  # data replicas; the ranks left over go to the inner strategy
    cfg_split: bool = False  # guidance branches on two halves of each replica


@dataclass
class TensorStrategyConfig(MeshStrategyConfig):
    name: str = "tensor"
    component: str | None = None  # the pipeline module to split; None: the denoiser
    plan: dict[str, TensorStyle] = field(default_factory=dict)  # module-name glob -> style
    # family name -> plan replacing the family's own (Family.tensor_plan) when `plan` is empty
    # (styles are checked when the plan is resolved: OmegaConf types no enum values inside
    # nested dicts)
    plans: dict[str, Any] = field(default_factory=dict)


@dataclass
class PatchStrategyConfig(MeshStrategyConfig):
    """Bands inside each guidance half of each replica."""

    # FSDP2 over the ranks of one image: each holds 1/N of the denoiser's and text encoders'
    # weights, each block's gathered just before it runs (strategies/patch/shard.py)
    shard_weights: bool = False


@dataclass
class USPConfig(PatchStrategyConfig):
    """Ulysses × Ring on the bands of one image (strategies/usp.py): heads re-sharded over
    `ulysses_degree` ranks, keys/values passed around rings of `ring_degree`; the two multiply
    to the ranks of one image (None: the other's quotient; both None: the most Ulysses the heads
    allow)."""

    name: str = "usp"
    ulysses_degree: int | None = None
    ring_degree: int | None = None


@dataclass
class PipeFusionConfig(MeshStrategyConfig):
    """PipeFusion (Wang et al. 2024): the transformer's blocks in consecutive stages, one per
    rank, the image's patches flowing through them; the other patches' keys/values are the
    previous step's after `warmup_steps` synchronous steps (strategies/pipefusion/)."""

    name: str = "pipefusion"
    warmup_steps: int = 1  # synchronous (whole-image) steps first
    patches: int | None = None  # patches per image (None: as many as stages)


@dataclass
class DisplacedPatchConfig(PatchStrategyConfig):
    warmup_steps: int = 4  # synchronous steps after the first
    groupnorm: GroupNormMode = GroupNormMode.corrected_async
    frozen: bool = False  # no refresh after warm-up: the no-communication ideal
    bucket_mb: float = 4.0  # pieces packed into one asynchronous all-gather


def register(store: Any) -> None:
    """The schemas under `schemas/strategy/NAME` of Hydra's ConfigStore `store`."""
    store.store(group="schemas/strategy", name="strategy", node=StrategyConfig)
    store.store(group="schemas/strategy", name="patch", node=PatchStrategyConfig)
    store.store(group="schemas/strategy", name="displaced_patch", node=DisplacedPatchConfig)
    store.store(group="schemas/strategy", name="tensor", node=TensorStrategyConfig)
    store.store(group="schemas/strategy", name="usp", node=USPConfig)
    store.store(group="schemas/strategy", name="pipefusion", node=PipeFusionConfig)
