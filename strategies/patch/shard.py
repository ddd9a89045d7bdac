"""Weight sharding (`strategy.shard_weights=true`): FSDP2 (`fully_shard`) over the ranks of one
image, for the denoiser and the text encoders.

Split: every parameter of those modules by rows (dim 0), one 1/N chunk per rank of the band
group (N ranks; FSDP pads dim 0 to a multiple of N). Units: each repeated block (the family's
`compile_regions` for the denoiser, the longest list of alike layers for a text encoder), then
the module's root for the parameters outside them.
Communicated: before a unit runs, one all-gather of its chunks (each rank sends its padded chunk
to the N−1 others); the whole weights are freed after the unit's forward
(reshard_after_forward=True, the root's too). A rank holds its chunks plus, while computing,
the root's and one block's whole weights.
Possible because the ranks of one image make the same module calls in lockstep: the same
prompts (guidance halves and data replicas are separate groups), the same denoiser calls
(their patch layers exchange at every layer anyway). Inference only: no gradients, buffers
stay whole. A meta module (the planner's) gets a stand-in that moves chunk-sized and whole
parameters around each unit's call the same way, so the replay sees the same memory and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum
from typing import Any

import torch
from torch import nn

from paraflow.comm import Communicator
from paraflow.config import Offload, Placement
from paraflow.errors import ParaflowError
from paraflow.models.components import TEXT_ENCODERS

SHARDED = (*TEXT_ENCODERS, "unet", "transformer")  # the modules sharded, by component name


def on_cpu(cfg: Any) -> bool:
    """Whether the run's ranks compute on the CPU (where offload=cpu moves nothing)."""
    wanted = str(getattr(cfg.launcher.accelerator, "value", cfg.launcher.accelerator))
    return wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available())


def check_sharding(cfg: Any) -> None:
    """Before any rank starts: a stage that runs a sharded module keeps it where it computes.
    FSDP places the chunks on the device the group's all-gathers run on; moving them after the
    stage (offload) fails (a tied weight, T5's embedding, cannot be swapped for its copy), and
    running the stage elsewhere (placement) would split the group across devices. On CPU ranks
    offload moves nothing (the default encode stage's offload=cpu stays allowed there)."""
    from hydra.utils import get_class

    offload_moves = not on_cpu(cfg)
    for name, spec in cfg.pipeline.stages.items():
        held = set(getattr(get_class(spec._target_), "components", ())) & set(SHARDED)
        checks: list[tuple[str, Enum, Enum]] = [
            ("placement", Placement(spec.placement), Placement.compute)]
        if offload_moves:
            checks.append(("offload", Offload(spec.offload), Offload.none))
        for key, value, allowed in checks:
            if held and value is not allowed:
                raise ParaflowError(
                    f"pipeline.stages.{name}.{key}={value.value} with strategy.shard_weights="
                    f"true: the stage runs {', '.join(sorted(held))}, whose weights are sharded "
                    f"over the ranks' devices; allowed: {key}={allowed.value} (add pipeline."
                    f"stages.{name}.{key}={allowed.value}, or strategy.shard_weights=false)")


def repeated_layers(module: nn.Module) -> list[nn.Module]:
    """A text encoder's blocks: the longest ModuleList of alike layers (CLIP's encoder.layers,
    T5's encoder.block), found by shape rather than by each library's attribute names."""
    best: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > len(best):
            kinds = {type(layer) for layer in child}
            if len(kinds) == 1:
                best = list(child)
    return best


def own_params(unit: nn.Module, inner: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters of `unit` outside the `inner` units (what one fully_shard call owns)."""
    skip = {id(p) for m in inner for p in m.parameters()}
    return [p for p in unit.parameters() if id(p) not in skip]


def chunk_rows(rows: int, n: int, rank: int) -> int:
    """Rows of dim 0 that rank `rank` holds (torch.chunk's cut, as FSDP2 cuts)."""
    size = math.ceil(rows / n)
    return max(0, min(size, rows - rank * size))


def _itemsize(p: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes per element of `p`, or of `dtype` if given and `p` is floating point."""
    return dtype.itemsize if dtype is not None and p.is_floating_point() else p.dtype.itemsize


def gather_bytes(params: Iterable[torch.Tensor], n: int, dtype: torch.dtype | None = None) -> int:
    """What one rank sends in a unit's all-gather: its padded chunk to each of the N−1 others
    (the ring convention of paraflow/comm.py). Read from the global shapes (a DTensor's too);
    `dtype`: as if cast to it."""
    total = 0
    for p in params:
        shape = tuple(p.shape) or (1,)
        total += math.ceil(shape[0] / n) * math.prod(shape[1:]) * _itemsize(p, dtype)
    return total * (n - 1)


def whole_bytes(params: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes of `params` whole (as gathered), as if cast to `dtype`."""
    return sum(math.prod(p.shape) * _itemsize(p, dtype) for p in params)


def sharded_bytes(module: nn.Module, dtype: torch.dtype, n: int, rank: int) -> int:
    """Parameter bytes rank `rank` holds of `module` sharded over `n` ranks, once cast to
    `dtype` (the planner's figure for a module it does not build: the text encoders)."""
    total = 0
    for p in module.parameters():
        shape = tuple(p.shape) or (1,)
        total += chunk_rows(shape[0], n, rank) * math.prod(shape[1:]) * _itemsize(p, dtype)
    return total


def encoder_gather_bytes(module: nn.Module, dtype: torch.dtype, n: int) -> int:
    """Bytes one rank sends for one call of a sharded text encoder cast to `dtype`."""
    blocks = repeated_layers(module)
    units = [*(list(b.parameters()) for b in blocks), own_params(module, blocks)]
    return sum(gather_bytes(params, n, dtype) for params in units)


def _book(comm: Communicator, params: list[nn.Parameter]) -> Any:
    """A forward pre-hook booking the unit's all-gather on `comm`: FSDP's collectives bypass
    the communicator, and run.json's bytes (and the planner's check against them) include
    them this way."""
    def hook(module: nn.Module, args: Any) -> None:
        comm.book(gather_bytes(params, comm.world_size))
    return hook


def shard_module(module: nn.Module, blocks: list[nn.Module], comm: Communicator,
                 device: torch.device) -> None:
    """fully_shard each of `blocks`, then `module` for the rest, over `comm`'s ranks on
    `device` (FSDP moves the chunks there); or the meta stand-in where `module` is on the meta
    device."""
    units = [(b, list(b.parameters())) for b in blocks]
    units.append((module, own_params(module, blocks)))
    if next(module.parameters()).is_meta:
        for unit, params in units:
            MetaShard(unit, params, comm)
        return
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if comm.group is None:
        raise RuntimeError("sharding over several ranks needs their process group")
    mesh = DeviceMesh.from_group(comm.group, device.type)
    for unit, params in units:
        unit.register_forward_pre_hook(_book(comm, params))
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)


def shard_pipeline(pipe: Any, model: nn.Module, blocks: list[nn.Module],
                   comm: Communicator, device: torch.device) -> None:
    """The denoiser `model` by `blocks`, and the pipeline's text encoders by their layers."""
    if comm.world_size < 2:
        return
    shard_module(model, blocks, comm, device)
    for name in TEXT_ENCODERS:
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, nn.Module) and next(encoder.parameters(), None) is not None:
            shard_module(encoder, repeated_layers(encoder), comm, device)


class MetaShard:
    """The planner's FSDP: `params` of `unit` replaced by chunk-sized meta parameters; before
    the unit runs, whole ones (new tensors: the replay counts them as live) and the all-gather
    booked; after it, the chunks again. A tied parameter (T5's embedding) stays one."""

    def __init__(self, unit: nn.Module, params: list[nn.Parameter], comm: Communicator) -> None:
        self.comm, self.params = comm, list({id(p): p for p in params}.values())
        self.whole: dict[int, torch.Tensor] = {}
        wanted = {id(p) for p in self.params}
        self.slots = [(owner, name, p) for owner in unit.modules()
                      for name, p in owner.named_parameters(recurse=False) if id(p) in wanted]
        self.chunks = {id(p): self._chunk(p) for p in self.params}
        self._swap(self.chunks)
        unit.register_forward_pre_hook(self.gather)
        unit.register_forward_hook(self.reshard)

    def _chunk(self, p: nn.Parameter) -> nn.Parameter:
        shape = tuple(p.shape) or (1,)
        rows = chunk_rows(shape[0], self.comm.world_size, self.comm.rank)
        return nn.Parameter(torch.empty((rows, *shape[1:]), dtype=p.dtype, device="meta"),
                            requires_grad=False)

    def _swap(self, by_id: dict[int, nn.Parameter]) -> None:
        for owner, name, p in self.slots:
            setattr(owner, name, by_id[id(p)])

    def gather(self, module: nn.Module, args: Any) -> None:
        self.comm.book(gather_bytes(self.params, self.comm.world_size))
        # The replay counts tensors by the objects ops return: hold those, not only the
        # Parameters wrapping them, until the unit is done.
        self.whole = {id(p): torch.empty_like(p) for p in self.params}
        self._swap({k: nn.Parameter(t, requires_grad=False) for k, t in self.whole.items()})

    def reshard(self, module: nn.Module, args: Any, out: Any) -> None:
        self._swap(self.chunks)
        self.whole = {}


def plan_note(cfg: Any, n: int) -> str:
    """The planner's line on sharded weights (figures from the model's config, per rank of a
    group of `n`): what a rank holds, what a running block adds, what the all-gathers send."""
    from paraflow.families import family_of
    from paraflow.models.skeleton import denoiser_component, pipeline_skeleton
    from paraflow.plan.report import human
    from paraflow.plan.weights import Policy, module_bytes, stage_policies

    parts, policies = pipeline_skeleton(cfg.model) or {}, stage_policies(cfg)
    name = denoiser_component(cfg.model)
    model, dtype = parts[name], policies.get(name, Policy()).dtype
    blocks = family_of(model).compile_regions(model)
    root = own_params(model, blocks)
    whole = sum(whole_bytes(b.parameters(), dtype) for b in blocks)
    biggest = max((whole_bytes(b.parameters(), dtype) for b in blocks), default=0)
    per_call = sum(gather_bytes(list(b.parameters()), n, dtype) for b in blocks) + \
        gather_bytes(root, n, dtype)
    encoders = [(parts[e], policies.get(e, Policy()).dtype) for e in TEXT_ENCODERS if e in parts]
    held = sum(sharded_bytes(m, d, n, 0) for m, d in encoders)
    text_whole = sum(module_bytes(m, d) for m, d in encoders)
    text_call = sum(encoder_gather_bytes(m, d, n) for m, d in encoders)
    return (f"strategy.shard_weights=true: the {name}'s and text encoders' weights in {n} chunks "
            f"over the ranks of one image (FSDP2): {name} "
            f"{human(sharded_bytes(model, dtype, n, 0))} per rank of "
            f"{human(module_bytes(model, dtype))}, text encoders {human(held)} of "
            f"{human(text_whole)}; while a block runs its whole weights and the root's are "
            f"gathered on top ({human(biggest + whole_bytes(root, dtype))} at most, of "
            f"{human(whole)} in blocks: in act. denoise and the device peak); each full "
            f"denoiser call's all-gathers send {human(per_call)} per rank (in sent/step), each "
            f"call of every text encoder {human(text_call)} (comm_encode, in sent/run)")
