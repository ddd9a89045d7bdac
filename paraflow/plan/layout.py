"""Where each rank sits in a run, from the config and the strategy object alone (no processes):
its images, the batch of its denoiser calls, its band of latent rows, and the sizes of the groups
it talks to — the same arithmetic the strategies run in setup() (paraflow/mesh.py,
strategies/patch/strategy.py, strategies/tensor.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig

from paraflow.mesh import world_of
from paraflow.plan.planned import planned_context
from paraflow.registry import build_strategy
from paraflow.run import expanded_prompts
from paraflow.strategies.data import DataStrategy, split_evenly
from paraflow.strategies.patch.bands import band_sizes
from paraflow.strategies.patch.strategy import PatchParallel, batch_groups
from paraflow.strategies.single import SingleDevice
from paraflow.strategies.tensor import MESH_DIM, TensorStrategy


@dataclass(frozen=True)
class Role:
    rank: int
    label: str
    chunks: tuple[int, ...]  # images per pass through the stage graph (pipeline.max_batch)
    parts: int = 1  # the denoiser batch is cut in this many parts (2: guidance split)
    part_sizes: tuple[int, ...] = ()  # ranks holding each part, in the image's replica
    bands: tuple[int, ...] = ()  # latent rows of each band of this rank's part (patch)
    band: int = 0  # this rank's band
    replica: int = 1  # ranks sharing one image (patch output gather, patch decode)
    replica_rank: int = 0
    decode_rows: int = 0  # latent rows this rank decodes under patch decode (0: all)
    tensor: int = 1  # ranks the denoiser's weights are split over
    cfg_rank: int = 0
    gather: int = 1  # ranks of the result gather this rank takes part in (1: none)
    gather_max: int = 0  # most images one of them sends
    replayed: bool = False  # a strategy the planner does not model: its own code is replayed

    @property
    def images(self) -> int:
        return sum(self.chunks)

    def key(self) -> tuple[Any, ...]:
        """Ranks with equal keys have equal memory and traffic (up to edge halos)."""
        bands = self.bands[self.band] if self.bands else 0
        if self.replayed:
            return (self.rank,)  # nothing known about which ranks are alike
        return (max(self.chunks, default=0), self.parts, self.part_sizes, len(self.bands), bands,
                self.replica, self.decode_rows, self.tensor)


def _chunks(images: int, max_batch: int) -> tuple[int, ...]:
    return tuple(min(max_batch, images - i) for i in range(0, images, max_batch))


def _replicas(n_images: int, degree: int, index: int) -> tuple[int, int]:
    """(images of replica `index`, most images of any replica)."""
    mine = len(split_evenly(n_images, degree, index))
    return mine, len(split_evenly(n_images, degree, 0))


def modelled(strategy: Any) -> bool:
    """Whether the planner has its own model of `strategy` (the built-in ones); any other is
    planned by replaying its code (replayed_roles, paraflow/plan/rank.py)."""
    return isinstance(strategy, (PatchParallel, TensorStrategy)) or type(strategy) in (
        DataStrategy, SingleDevice)


def replayed_roles(cfg: DictConfig, world: int, n: int, batch: int) -> list[Role]:
    """Every rank's images from the strategy's own setup and assign_images on a planned
    context (paraflow/plan/planned.py)."""
    roles = []
    for rank in range(world):
        strategy, ctx = build_strategy(cfg.strategy), planned_context(rank, world)
        strategy.setup(ctx)
        images = strategy.assign_images(n, ctx)
        roles.append(Role(rank, f"{strategy.name} rank {rank}/{world}",
                          _chunks(len(images), batch), replayed=True))
    return roles


def rank_roles(cfg: DictConfig, strategy: Any, unit: int, factor: int) -> list[Role]:
    """Every rank's Role. `unit`: the denoiser's downsampling; `factor`: pixels per latent row."""
    world, n = world_of(cfg), len(expanded_prompts(cfg))
    batch = int(cfg.pipeline.max_batch)
    rows = int(cfg.height) // factor
    roles = []
    if isinstance(strategy, (PatchParallel, TensorStrategy)):
        layout = strategy.mesh_layout(world)
        degree = 1 if layout is None else layout["data"]
        replica = world // degree
        groups = batch_groups(replica, strategy.cfg_split)
        for rank in range(world):
            local, data_index = rank % replica, rank // replica
            mine, most = _replicas(n, degree, data_index)
            gather = degree if degree > 1 and local == 0 else 1
            part = next(i for i, g in enumerate(groups) if local in g)
            base = Role(rank, "", _chunks(mine, batch), parts=len(groups),
                        part_sizes=tuple(len(g) for g in groups), replica=replica,
                        replica_rank=local, cfg_rank=part, gather=gather, gather_max=most)
            where = f"data {data_index} · " if degree > 1 else ""
            where += f"cfg {part} · " if len(groups) > 1 else ""
            if isinstance(strategy, TensorStrategy):
                tensor = layout[MESH_DIM] if layout is not None else world
                roles.append(replace(base, label=f"{where}tensor {local % tensor}/{tensor}",
                                     tensor=tensor))
                continue
            members = groups[part]
            bands = tuple(band_sizes(rows, len(members), unit))
            band = members.index(local)
            label = f"{where}band {band}/{len(members)} ({bands[band]} latent rows)"
            roles.append(replace(base, label=label, bands=bands, band=band,
                                 decode_rows=band_sizes(rows, replica)[local]))
        return roles
    if isinstance(strategy, DataStrategy):
        for rank in range(world):
            images = len(split_evenly(n, world, rank))
            roles.append(Role(rank, f"data {rank}/{world}", _chunks(images, batch),
                              gather=world, gather_max=len(split_evenly(n, world, 0))))
        return roles
    if isinstance(strategy, SingleDevice):  # every rank makes every image
        return [Role(rank, "whole model, every image", _chunks(n, batch), gather=world,
                     gather_max=n) for rank in range(world)]
    return replayed_roles(cfg, world, n, batch)
