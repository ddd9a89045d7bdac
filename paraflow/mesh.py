"""Hybrid layouts: a run's ranks as named dimensions of one DeviceMesh, outermost first:
`data` (replicas, each making its own share of the images) × `cfg` (the two guidance branches, or
1) × the inner strategy's dimension (`patch` or `tensor`).

Ranks fill the mesh row-major, so the innermost dimension — the one that talks at every layer —
holds consecutive ranks: the same node, the fastest link. Every dimension gets process groups
made with the launcher's timeout; collectives on them still go through a `Communicator`
(`dim_comm`, `replica_comm`) that counts into the context's books.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from paraflow.comm import Communicator
from paraflow.errors import ParaflowError
from paraflow.models.configured import configured_denoiser, configured_family

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from paraflow.context import ParallelContext

Layout = dict[str, int]  # dimension name -> size, outermost first


def world_of(cfg: DictConfig) -> int:
    return int(cfg.launcher.devices) * int(cfg.launcher.num_nodes)


def possible_data_degrees(world: int, cfg_split: bool, uneven_cfg: bool = False) -> list[int]:
    """data_degree values that split `world` ranks into equal replicas (of an even size with the
    guidance split, unless `uneven_cfg` allows one replica with unequal halves)."""
    per = 2 if cfg_split else 1
    found = [d for d in range(1, world + 1) if world % (d * per) == 0]
    return [1, *found] if uneven_cfg and world >= 2 and 1 not in found else found


def hybrid_layout(world: int, data_degree: int, cfg_split: bool, inner: str,
                  uneven_cfg: bool = False) -> Layout:
    """The mesh of `world` ranks: data × cfg × inner, the inner dimension taking what is left.
    Bad degrees raise ParaflowError naming the values and those that work (`uneven_cfg`: the
    strategy also takes one replica with unequal guidance halves)."""
    keys = f"strategy.data_degree={data_degree}" + (" with cfg_split=true" if cfg_split else "")
    options = possible_data_degrees(world, cfg_split, uneven_cfg)
    hint = (f"possible data_degree values for {world} ranks: "
            + (", ".join(map(str, options)) if options else "none, use an even rank count"))
    if data_degree < 1:
        raise ParaflowError(f"strategy.data_degree={data_degree}: must be at least 1; {hint}")
    if data_degree > world:
        raise ParaflowError(f"strategy.data_degree={data_degree} is larger than the world size "
                            f"{world} (launcher.devices × launcher.num_nodes); {hint}")
    per = 2 if cfg_split else 1
    if world % (data_degree * per):
        raise ParaflowError(f"{keys}: data_degree × cfg ({per}) × {inner} degree must equal "
                            f"the world size {world} (launcher.devices × launcher.num_nodes), "
                            f"but {world} ranks do not split into {data_degree * per} equal "
                            f"parts; {hint}")
    return {"data": data_degree, "cfg": per, inner: world // (data_degree * per)}


def check_cfg_split(cfg: DictConfig) -> None:
    """The guidance split needs two ranks and guidance that is on."""
    if world_of(cfg) < 2:
        raise ParaflowError("strategy.cfg_split=true needs at least 2 ranks "
                            f"(launcher.devices={cfg.launcher.devices})")
    if float(cfg.guidance_scale) <= 1.0:
        raise ParaflowError(f"strategy.cfg_split=true splits the two guidance branches but "
                            f"guidance_scale={cfg.guidance_scale} turns guidance off; use "
                            "guidance_scale > 1 or cfg_split=false")
    family = configured_family(cfg.model)
    if family is not None and family.guidance_distilled(configured_denoiser(cfg.model)):
        raise ParaflowError(
            f"strategy.cfg_split=true: model {cfg.model.get('name', cfg.model.get('path'))} is "
            "guidance-distilled (its guidance scale is an input of the denoiser), so there is "
            "no unconditional branch to split; use cfg_split=false")


def layout_label(name: str, cfg_split: bool, data_degree: int) -> str:
    """A strategy's mode label with its hybrid options, for messages and run records."""
    parts = [name]
    if cfg_split:
        parts.append("cfg_split")
    if data_degree > 1:
        parts.append(f"data_degree={data_degree}")
    return " ".join(parts)


def dim_groups(layout: Mapping[str, int], dim: str) -> list[list[int]]:
    """The rank lists along `dim`: ranks that differ only in their `dim` coordinate."""
    names, sizes = list(layout), list(layout.values())
    ranks = torch.arange(int(torch.tensor(sizes).prod())).reshape(sizes)
    return ranks.movedim(names.index(dim), -1).reshape(-1, layout[dim]).tolist()


def build_mesh(layout: Layout | None, device_type: str,
               timeout: timedelta | None = None) -> DeviceMesh | None:
    """The DeviceMesh of `layout` over the initialised world; None with one rank or no layout.
    Every rank must call it (group creation is collective)."""
    if layout is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    world, rank = dist.get_world_size(), dist.get_rank()
    groups = []
    for dim, size in layout.items():
        mine: Any = None
        for members in dim_groups(layout, dim):
            # A dimension spanning every rank reuses the world group (no new connections).
            group = (dist.group.WORLD if size == world
                     else dist.new_group(members, timeout=timeout))
            if rank in members:
                mine = group
        groups.append(mine)
    ranks = torch.arange(world).reshape(tuple(layout.values()))
    return DeviceMesh.from_group(groups, device_type, ranks, mesh_dim_names=tuple(layout))


def mesh_of(ctx: ParallelContext, layout: Layout | None) -> DeviceMesh | None:
    """The context's mesh, which must be `layout`'s; None with one rank. The first call builds
    it (collective: every rank's strategy asks for it in its setup, at the same point)."""
    if ctx.world_size == 1 or layout is None:
        return None
    if ctx.mesh is None:
        ctx.mesh = build_mesh(layout, ctx.device.type, ctx.comm.timeout)
    mesh = ctx.mesh
    found = None if mesh is None else dict(zip(mesh.mesh_dim_names or (), mesh.shape))
    if found != layout:
        raise RuntimeError(f"the context's mesh {found} is not the strategy's layout {layout}; "
                           "build the context with paraflow.launcher.rank_context")
    return mesh


def dim_comm(ctx: ParallelContext, mesh: DeviceMesh, dim: str) -> Communicator:
    """A communicator over this rank's ranks along mesh dimension `dim`, counting into ctx's."""
    index = list(mesh.mesh_dim_names or ()).index(dim)
    size = mesh.shape[index]
    if size == ctx.world_size:
        return ctx.comm
    lines = mesh.mesh.movedim(index, -1).reshape(-1, size).tolist()
    members = next(line for line in lines if ctx.rank in line)
    return ctx.comm.along(lambda: mesh.get_group(dim), members, members.index(ctx.rank))


def replica_comm(ctx: ParallelContext, mesh: DeviceMesh) -> Communicator:
    """A communicator over this rank's data replica (every dimension but `data`), local ranks
    row-major over the inner dimensions. Collective: every rank calls it."""
    replicas = mesh.shape[0]
    if replicas == 1:
        return ctx.comm
    return ctx.comm.split(mesh.mesh.reshape(replicas, -1).tolist())
