"""One kind of rank (ranks with equal Role.key): the bytes it sends at every step and in the
patch decode, from the layer shapes of plain meta calls (comm.py), then its peak working memory
from a replay of the strategy's own code on meta tensors (simulate.py)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from paraflow.adapters import context_width, latent_channels, replicated_input_convs
from paraflow.config import StageParallel
from paraflow.mesh import world_of
from paraflow.models.skeleton import component_skeleton
from paraflow.plan.comm import Pieces, all_gather, all_reduce, layer_pieces, padded
from paraflow.plan.layout import Role
from paraflow.plan.planned import PlannedComm, planned_context
from paraflow.plan.simulate import Inputs, install_patch, replay, shard_on_meta
from paraflow.plan.weights import Policy
from paraflow.registry import build_strategy
from paraflow.strategies.guidance import GuidanceSplit
from paraflow.strategies.patch.bands import BandPlan, band_sizes
from paraflow.strategies.patch.strategy import PatchParallel
from paraflow.strategies.schemas import GroupNormMode
from paraflow.strategies.tensor import TensorStrategy, resolve_plan


def _skeleton(cfg: DictConfig, name: str, policies: dict[str, Policy]) -> Any:
    module = component_skeleton(cfg.model, name)
    if module is None:
        raise RuntimeError(f"model={cfg.model.name}: no {name} module from its config")
    dtype = policies.get(name, Policy()).dtype
    return nn.Module.to(module, dtype=dtype)  # nn.Module's: diffusers' warns on every cast


def patch_decode_wanted(cfg: DictConfig, strategy: Any) -> bool:
    """Whether the decode stage runs in bands (pipeline.stages.*.parallel, as Decode reads it)."""
    for spec in cfg.pipeline.stages.values():
        if "vae" in getattr(get_class(spec._target_), "components", ()):
            parallel = StageParallel(spec.get("parallel", "none"))
            shared = strategy.replicated_latents
            return parallel is StageParallel.patch or (parallel is StageParallel.auto and shared)
    return False


class RankWork:
    """The traffic and memory of one kind of rank (ranks with equal Role.key share it)."""

    def __init__(self, cfg: DictConfig, role: Role, inputs: Inputs,
                 policies: dict[str, Policy], unit: int, cpu: bool) -> None:
        self.role, self.inputs, self.unit = role, inputs, unit
        # fresh: the replay keeps state in it; Any: the planner still reads concrete options
        self.strategy: Any = build_strategy(cfg.strategy)
        self.unet = _skeleton(cfg, "unet", policies)
        self.vae = _skeleton(cfg, "vae", policies)
        self.patch = isinstance(self.strategy, PatchParallel)
        self.decode_over = role.replica if patch_decode_wanted(cfg, self.strategy) else 1
        self.per_step, self.decode, self.stale = [0] * int(cfg.steps), 0, 0
        tensor = isinstance(self.strategy, TensorStrategy) and role.tensor > 1
        splits = resolve_plan(self.unet, cast(Any, self.strategy).plan) if tensor else []
        reduced = [s.name for s in splits if s.style in ("rowwise", "conv_in")]
        for images, count in Counter(role.chunks).items():
            self._count(self._unet_pieces(images, reduced), images, count)
        if splits:
            shard_on_meta(self.unet, splits, role.tensor)
        if isinstance(self.strategy, TensorStrategy) and role.parts == 2:
            GuidanceSplit(PlannedComm(2, role.cfg_rank)).install(self.unet)
        if isinstance(self.strategy, PatchParallel):
            install_patch(self.strategy, role, self.unet)
        self.peaks = (0, 0)
        if role.replayed:
            self._replay_own_code(cfg, cpu)
        elif role.chunks:
            self.peaks = replay(self.strategy, role, self.unet, self.vae, inputs,
                                max(role.chunks), int(cfg.steps), self.decode_over, cpu)

    def _replay_own_code(self, cfg: DictConfig, cpu: bool) -> None:
        """A strategy the planner does not model: its setup and parallelize on this rank's
        planned context, then the replay, whose communicator books the bytes of each step."""
        ctx = planned_context(self.role.rank, world_of(cfg))
        self.strategy.setup(ctx)
        self.strategy.parallelize(SimpleNamespace(unet=self.unet, vae=self.vae), ctx)
        self.per_step = [0] * int(cfg.steps)
        if not self.role.chunks:
            return
        self.peaks = replay(self.strategy, self.role, self.unet, self.vae, self.inputs,
                            max(self.role.chunks), int(cfg.steps), self.decode_over, cpu, ctx)
        booked = dict(ctx.comm.bytes_by_step)
        replayed = sorted(s for s in booked if s is not None)
        passes = len(self.role.chunks)
        for step in range(len(self.per_step)):  # a step not replayed repeats the last one before
            like = max([s for s in replayed if s <= step], default=None)
            self.per_step[step] = passes * booked.get(like, 0) if like is not None else 0
        self.decode = passes * booked.get(None, 0)

    def _unet_pieces(self, images: int, reduced: list[str]) -> Pieces:
        role, inputs, unet = self.role, self.inputs, self.unet
        batch = images * (2 if inputs.guidance else 1) // role.parts
        channels, rows, width = inputs.latent
        band = BandPlan(role.bands, role.band) if self.patch else None
        dtype = next(unet.parameters()).dtype
        sample = torch.empty(batch, channels, role.bands[role.band] if band else rows, width,
                             dtype=dtype, device="meta")
        embeds = torch.empty(batch, inputs.tokens, context_width(unet), dtype=dtype,
                             device="meta")
        added = None if inputs.added is None else {
            k: torch.empty(batch, w, dtype=dtype, device="meta") for k, w in inputs.added.items()}
        return layer_pieces(unet, lambda: unet(sample, torch.tensor(500, device="meta"),
                                               encoder_hidden_states=embeds,
                                               added_cond_kwargs=added, return_dict=False)[0],
                            band, reduced, replicated_input_convs(unet))

    def _count(self, pieces: Pieces, images: int, count: int) -> None:
        """Add `count` passes of `images` images to the books (steps, decode, stale)."""
        role, strategy, steps = self.role, self.strategy, len(self.per_step)
        sync = later = 0
        if isinstance(strategy, PatchParallel):
            rows = self.inputs.latent[1]
            tallest = max(max(band_sizes(rows, n, self.unit)) for n in role.part_sizes)
            out = all_gather(padded(pieces.output, role.bands[role.band], tallest), role.replica)
            n = len(role.bands)
            layers = all_gather(pieces.exchanged(), n) if strategy.exchange else 0
            norms = strategy.groupnorm is not GroupNormMode.separate
            sync = layers + out
            later = out + (0 if strategy.frozen or not strategy.exchange
                           else all_gather(pieces.exchanged(norms), n))
            if strategy.displaced and strategy.exchange:
                self.stale = max(self.stale, all_gather(pieces.exchanged(), n))
        elif isinstance(strategy, TensorStrategy):
            sync = sum(all_reduce(b, role.tensor) for b in pieces.reduced)
            sync += all_gather(pieces.output, 2) if role.parts == 2 else 0
            later = sync
        synchronous = steps
        if getattr(strategy, "displaced", False):
            synchronous = min(steps, int(strategy.warmup_steps) + 1)
        for step in range(steps):
            self.per_step[step] += count * (sync if step < synchronous else later)
        if self.decode_over > 1:
            self.decode += count * self._decode_bytes(images)

    def _decode_bytes(self, images: int) -> int:
        vae, over = self.vae, self.decode_over
        _, rows, width = self.inputs.latent
        sizes = tuple(band_sizes(rows, over))
        me = self.role.replica_rank
        z = torch.empty(images, latent_channels(vae), sizes[me], width,
                        dtype=next(vae.parameters()).dtype, device="meta")
        pieces = layer_pieces(vae, lambda: vae.decode(z, return_dict=False)[0],
                              BandPlan(sizes, me))
        return (all_gather(pieces.exchanged(), over)
                + all_gather(padded(pieces.output, sizes[me], max(sizes)), over))
