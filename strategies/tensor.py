"""Tensor parallelism: the denoiser's weights split over the N ranks of the mesh dimension `tensor`
(the whole world, or what is left of it after `data_degree` replicas and the guidance split:
mesh data × cfg × tensor, paraflow/mesh.py).

Every rank runs every image through the whole network, holding ~1/N of the split layers:

- attention: to_q/to_k/to_v column-wise (rank r keeps heads r·H/N … (r+1)·H/N, and the module is
  told it has H/N heads), to_out row-wise → one all-reduce of the B×T×C output;
- feed-forward: the GEGLU projection column-wise (value and gate rows interleaved first so each
  rank keeps matching halves), the output linear row-wise → one all-reduce of B×T×C;
- ResNet block: conv1 and time_emb_proj by output channels, norm2 along whole groups, conv2 by
  input channels → one all-reduce of B×C×H×W;
- diffusion transformers: joint attention's text projections as the image's (add_q/k/v
  column-wise, to_add_out row-wise), Flux's single-stream MLP column-wise and its proj_out over
  [attention, MLP] row-wise (columns reordered to match); the adaLN modulation linears by output
  features, then one all-gather of their small B × 6C output (style colwise_gather). Embedders
  and the final projection stay whole on every rank.

Bytes per rank per denoiser call (ring all-reduce, as the communicator counts them):
2·(N−1)/N · Σ over row-wise and input-split layers of the bytes of their output.

The plan — module-name glob → style — is data: `strategy.plan`, or when that is empty the plan of
the model's family in `strategy.plans`, else the family's own `tensor_plan`
(paraflow/families/); a new architecture needs a new plan, not new code. A family plan may name
layers some of its variants lack (SD3.5's second attention); a pattern of `strategy.plan` that
matches nothing is an error.
Linears are split by DTensor (`parallelize_module`, ColwiseParallel / RowwiseParallel with the
output left as a partial sum); convolutions and GroupNorm by hand (tensor_layers.py). Every
reduction goes through the communicator, synchronously, so no asynchronous collective tensor
outlives a layer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import reduce as fold
from typing import Any, Literal, cast, get_args

from omegaconf import DictConfig
from torch import nn

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.families import denoiser, denoiser_call, family_of
from paraflow.families.base import attention_heads, set_attention_heads
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
from paraflow.plugin import StrategyBase
from paraflow.strategies.guidance import GuidanceSplit
from paraflow.strategies.replicas import DataReplicas
from paraflow.strategies.tensor_layers import (
    Gather,
    InputShardedConv2d,
    Reduce,
    finish_rowwise,
    interleave_concat_inputs,
    interleave_gated,
    move_bias_out,
    shard_conv_out,
    shard_group_norm,
    shard_linear_gathered,
)

Style = Literal["colwise", "colwise_gated", "colwise_gather", "rowwise", "rowwise_concat",
                "heads", "conv_out", "conv_in", "groupnorm"]
STYLES: tuple[str, ...] = get_args(Style)
MESH_DIM = "tensor"


@dataclass(frozen=True)
class PlannedSplit:
    """One module the plan splits, and the count that must divide by the rank count."""

    name: str
    style: Style
    count: int
    unit: str


def _split_size(name: str, module: nn.Module, style: Style) -> tuple[int, str]:
    def need(kind: type[nn.Module]) -> None:
        if not isinstance(module, kind):
            raise ParaflowError(f"strategy.plan: {name} is a {type(module).__name__}; style "
                                f"'{style}' applies to {kind.__name__} modules")

    if style == "heads":
        heads = attention_heads(module)
        if heads is None:
            raise ParaflowError(f"strategy.plan: {name} ({type(module).__name__}) has no integer "
                                "`heads`; style 'heads' applies to attention modules")
        return heads, "attention heads"
    if style in ("colwise", "colwise_gated", "colwise_gather", "rowwise", "rowwise_concat"):
        need(nn.Linear)
        linear = cast(nn.Linear, module)
        if style == "rowwise":
            return linear.in_features, "input features"
        if style == "rowwise_concat":
            return (math.gcd(linear.out_features, linear.in_features - linear.out_features),
                    "features in each concatenated input")
        if style == "colwise_gated":
            return linear.out_features // 2, "gated features"
        return linear.out_features, "output features"
    if style in ("conv_out", "conv_in"):
        need(nn.Conv2d)
        conv = cast(nn.Conv2d, module)
        if style == "conv_out":
            return conv.out_channels, "output channels"
        return conv.in_channels, "input channels"
    need(nn.GroupNorm)
    return cast(nn.GroupNorm, module).num_groups, "groups"


def resolve_plan(model: nn.Module, plan: Mapping[str, str], strict: bool = True
                 ) -> list[PlannedSplit]:
    """The modules of `model` the plan splits, in module order; each takes the first pattern
    (glob over the dotted module name) that matches it. With `strict`, a pattern matching
    nothing is an error."""
    for glob, style in plan.items():
        if style not in STYLES:
            raise ParaflowError(f"strategy.plan.{glob}={style}: unknown style; "
                                f"use one of {', '.join(STYLES)}")
    hits = dict.fromkeys(plan, 0)
    splits = []
    for name, module in model.named_modules():
        pattern = next((p for p in plan if name and fnmatchcase(name, p)), None)
        if pattern is None:
            continue
        hits[pattern] += 1
        style = cast(Style, plan[pattern])
        splits.append(PlannedSplit(name, style, *_split_size(name, module, style)))
    unused = [p for p, n in hits.items() if n == 0]
    if unused and strict:
        raise ParaflowError(f"strategy.plan: {', '.join(unused)} match no module of the "
                            f"denoiser ({type(model).__name__}); fix or remove them")
    return splits


def allowed_degrees(splits: list[PlannedSplit]) -> list[int]:
    """Rank counts that split every planned layer evenly (the divisors of the counts' gcd)."""
    common = fold(math.gcd, (s.count for s in splits), 0)
    return [d for d in range(1, common + 1) if common % d == 0] if common else [1]


def check_divisible(splits: list[PlannedSplit], n: int, what: str = "ranks") -> None:
    # Name heads and groups first: they are what a user recognises in a model card.
    order = {"heads": 0, "groupnorm": 1}
    bad = min((s for s in splits if s.count % n), key=lambda s: order.get(s.style, 2),
              default=None)
    if bad is not None:
        allowed = ", ".join(str(d) for d in allowed_degrees(splits))
        raise ParaflowError(f"strategy=tensor over {n} {what}: layer {bad.name} has {bad.count} "
                            f"{bad.unit}, which do not split into {n} equal parts; rank counts "
                            f"this model allows: {allowed}")


def apply_plan(model: nn.Module, splits: list[PlannedSplit], mesh: Any, n: int, rank: int,
               reduce: Reduce, gather: Gather) -> None:
    """Shard `model` in place: this rank keeps the `rank`-th of `n` slices of each planned layer."""
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    modules = dict(model.named_modules())
    linear_plan: dict[str, Any] = {}
    biases: dict[str, nn.Parameter | None] = {}
    for split in splits:
        module = modules[split.name]
        if split.style == "colwise":
            linear_plan[split.name] = ColwiseParallel()
        elif split.style == "colwise_gated":
            interleave_gated(cast(nn.Linear, module), n)
            linear_plan[split.name] = ColwiseParallel()
        elif split.style in ("rowwise", "rowwise_concat"):
            if split.style == "rowwise_concat":
                interleave_concat_inputs(cast(nn.Linear, module), n)
            biases[split.name] = move_bias_out(cast(nn.Linear, module))
            linear_plan[split.name] = RowwiseParallel(output_layouts=Partial())
        elif split.style == "colwise_gather":
            shard_linear_gathered(cast(nn.Linear, module), n, rank, gather)
        elif split.style == "heads":
            set_attention_heads(module, split.count // n)
        elif split.style == "conv_out":
            shard_conv_out(cast(nn.Conv2d, module), n, rank)
        elif split.style == "groupnorm":
            shard_group_norm(cast(nn.GroupNorm, module), n, rank)
        else:  # conv_in
            parent_name, _, child = split.name.rpartition(".")
            sharded = InputShardedConv2d.from_conv(cast(nn.Conv2d, module), n, rank, reduce)
            setattr(modules[parent_name] if parent_name else model, child, sharded)
    # Every rank holds the same full weights, so each takes its own slice (no scatter).
    parallelize_module(model, mesh, linear_plan, src_data_rank=None)
    for name, bias in biases.items():
        finish_rowwise(cast(nn.Linear, modules[name]), reduce, bias)


class TensorStrategy(StrategyBase):
    """Tensor parallelism (see the module docstring): every rank of a replica makes every image
    of the replica, rank 0 writes them all."""

    name = "tensor"

    def __init__(self, plan: Mapping[str, str] | None = None,
                 plans: Mapping[str, Mapping[str, str]] | None = None,
                 component: str | None = None, cfg_split: bool = False,
                 data_degree: int = 1) -> None:
        self.plan = dict(plan or {})
        self.plans = {family: dict(p) for family, p in (plans or {}).items()}
        self.component = component
        self.cfg_split, self.data_degree = bool(cfg_split), int(data_degree)
        self.splits: list[PlannedSplit] = []
        self.mesh: Any = None  # the `tensor` sub-mesh DTensor shards over
        self.reduce: Reduce | None = None
        self.all_gather: Gather | None = None
        self.guidance: GuidanceSplit | None = None
        self.replicas = DataReplicas()
        self._image_comm: Communicator | None = None

    def splits_of(self, model: nn.Module) -> list[PlannedSplit]:
        """What the plan splits in `model`: strategy.plan, else strategy.plans.FAMILY, else
        the family's own default plan."""
        if self.plan:
            return resolve_plan(model, self.plan)
        family = family_of(model)
        plan = self.plans.get(family.name) or family.tensor_plan
        if not plan:
            raise ParaflowError(
                f"strategy=tensor has no plan for this model's family ({family.name}); give "
                f"strategy.plan (module-name glob -> style: {', '.join(STYLES)}) or "
                f"strategy.plans.{family.name}")
        return resolve_plan(model, plan, strict=False)

    @property
    def mode(self) -> str:
        return layout_label(self.name, self.cfg_split, self.data_degree)

    def mesh_layout(self, world_size: int) -> Layout:
        return hybrid_layout(world_size, self.data_degree, self.cfg_split, MESH_DIM)

    def degree(self, cfg: DictConfig) -> int:
        """The ranks the weights are split over (the `tensor` dimension)."""
        return self.mesh_layout(world_of(cfg))[MESH_DIM]

    def validate(self, cfg: DictConfig) -> None:
        """Before any rank starts: the mesh, then the plan against the denoiser built on the
        meta device."""
        from paraflow.models.lora import unfused_entries
        from paraflow.models.skeleton import denoiser_skeleton

        if self.cfg_split:
            check_cfg_split(cfg)
        if unfused_entries(cfg.model):
            raise ParaflowError("strategy=tensor shards plain layers, not unfused LoRA "
                                "adapters: set model.lora_fuse=true to merge model.lora's into "
                                "the weights; adapters switched per generation (model.adapters, "
                                "a service's serve.lora) cannot be merged, so they need another "
                                "strategy")
        world = world_of(cfg)
        layout = self.mesh_layout(world)
        skeleton = denoiser_skeleton(cfg.model)
        if skeleton is not None:
            n = layout[MESH_DIM]
            what = "ranks" if n == world else (
                f"tensor ranks ({world} = data {layout['data']} × cfg {layout['cfg']} × tensor "
                f"{n})")
            check_divisible(self.splits_of(skeleton), n, what)

    def setup(self, ctx: ParallelContext) -> None:
        mesh = mesh_of(ctx, self.mesh_layout(ctx.world_size))
        if mesh is None:
            return
        self.mesh = mesh[MESH_DIM]
        self.reduce = dim_comm(ctx, mesh, MESH_DIM).all_reduce
        self.all_gather = dim_comm(ctx, mesh, MESH_DIM).all_gather
        if self.cfg_split:
            self.guidance = GuidanceSplit(dim_comm(ctx, mesh, "cfg"))
        self.replicas = DataReplicas.of(ctx, mesh)
        self._image_comm = replica_comm(ctx, mesh)

    def shared_image_comm(self, ctx: ParallelContext) -> Communicator | None:
        """The ranks of this rank's replica (tensor × cfg): they work on the same images."""
        return self._image_comm or ctx.comm

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        model = denoiser(pipe) if self.component is None else getattr(pipe, self.component, None)
        if not isinstance(model, nn.Module):
            raise ParaflowError(f"strategy.component={self.component}: the pipeline has no such "
                                "module")
        self.splits = self.splits_of(model)
        if self.guidance is not None:  # halves the batch of every denoiser call
            self.guidance.install(denoiser_call(pipe))
        if (self.mesh is None or self.reduce is None or self.all_gather is None
                or self.mesh.size() == 1):
            return
        n, rank = self.mesh.size(), self.mesh.get_coordinate()[0]  # no group needed (planner)
        check_divisible(self.splits, n)
        apply_plan(model, self.splits, self.mesh, n, rank, self.reduce, self.all_gather)

    def assign_images(self, n_images: int, ctx: ParallelContext) -> list[int]:
        return self.replicas.assign(n_images)

    def result_comm(self, ctx: ParallelContext) -> Communicator | None:
        return self.replicas.result_comm()  # within a replica every rank made the same

    def describe(self, cfg: DictConfig, ctx: ParallelContext) -> str:
        cfg_part = f"cfg {self.guidance.comm.rank} · " if self.guidance is not None else ""
        n = 1 if self.mesh is None else self.mesh.size()
        rank = 0 if self.mesh is None else self.mesh.get_coordinate()[0]
        return f"{self.replicas.label()}{cfg_part}tensor {rank}/{n}"

    def alike_key(self, cfg: DictConfig, ctx: ParallelContext) -> Hashable | None:
        return "tensor"  # the same slice sizes and collectives on every rank

