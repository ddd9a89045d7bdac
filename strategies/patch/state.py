"""The one object every patch layer shares: the band plan, the step counter, the previous
step's activations of the other bands, and the asynchronous all-gathers in flight.

Synchronous steps (`sync_patch`, and the warm-up of `displaced_patch`) all-gather each layer's
piece at once. After warm-up a layer reads the pieces gathered at the previous step (`stale`),
computes, then `publish`es its fresh piece; published pieces are packed into buckets of about
`bucket_bytes` and each bucket is sent as one asynchronous all-gather, waited for when its first
layer asks for it at the next step. `frozen` stops publishing after warm-up (no communication:
the speed ceiling).

Memory: only the other bands' pieces are kept (a layer always has its own fresh one), each
replaced by the layer's next gather, and a layer's stale pieces are dropped once it has read them
(the next step reads what is in flight now), so the stale buffers hold about (N−1)/N of one
step's exchanged activations, not a second and third copy. A layer a step cache skips
(paraflow/cache) keeps the pieces it last had, one step older at its next run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paraflow.comm import Communicator, GatherHandle
from paraflow.strategies.patch.bands import BandPlan
from paraflow.strategies.schemas import GroupNormMode


@dataclass
class _Bucket:
    handle: GatherHandle
    entries: list[tuple[str, int, int, torch.Size]]  # key, offset, numel, shape


@dataclass
class PatchState:
    comm: Communicator  # the ranks that share one image, one band each
    displaced: bool = False
    warmup_steps: int = 0
    frozen: bool = False
    groupnorm: GroupNormMode = GroupNormMode.sync
    bucket_bytes: int = 4 << 20
    plan: BandPlan | None = None
    whole_input: torch.Tensor | None = None  # the model call's input, whole (every rank has it)
    context_tokens: int = 0  # text tokens of the call (Flux's single-stream blocks lead with them)
    step: int = 0
    fresh: bool = True  # this step's activations are fresh (begin_step; `synchronous`)
    previous: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    _pending: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = field(default_factory=dict)
    _pending_bytes: int = 0
    _inflight: dict[str, _Bucket] = field(default_factory=dict)

    @property
    def synchronous(self) -> bool:
        """Fresh activations this step (every step of sync_patch; warm-up of displaced)."""
        return self.fresh

    @property
    def band(self) -> BandPlan:
        if self.plan is None:
            raise RuntimeError("patch layer called outside a patch-parallel model call")
        return self.plan

    def begin_step(self, step: int) -> None:
        if step == 0:  # a new image batch: nothing from earlier steps applies
            self.drain()
            self.previous.clear()
        self.step = step
        # A flag set here, not a comparison of the step number in the layers: compiled layers
        # guard on it and compile twice (fresh, displaced) instead of once per step.
        self.fresh = not self.displaced or step <= self.warmup_steps

    def gather(self, key: str, piece: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's fresh `piece` now (blocking); with displaced steps to come, kept for
        them (replaced by the next warm-up step's: a layer a step cache skipped at the last
        warm-up step reads the latest it has)."""
        pieces = self.comm.all_gather(piece)
        if self.displaced:
            self.previous[key] = self._others(pieces)
        return pieces

    def stale(self, key: str, own: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's piece of layer `key`: the other ranks' from the previous step, shaped
        like `own`, which fills this rank's place."""
        bucket = self._inflight.get(key)
        if bucket is not None:
            self._unpack(bucket)
        pieces = self.previous.get(key) if self.frozen else self.previous.pop(key, None)
        if pieces is None:
            raise RuntimeError(f"no activations of the previous step for layer {key} (a patch "
                               "layer ran twice in one step, or not in the warm-up)")
        return [own if p is None else p.view(own.shape) for p in pieces]

    def publish(self, key: str, piece: torch.Tensor) -> None:
        """Queue this step's fresh `piece` for the next step (no-op when frozen)."""
        if self.frozen:
            return
        self._pending.setdefault(piece.dtype, []).append((key, piece.detach().reshape(-1)))
        self._pending_bytes += piece.numel() * piece.element_size()
        if self._pending_bytes >= self.bucket_bytes:
            self.flush()

    def flush(self) -> None:
        """Send every queued piece now, one asynchronous all-gather per dtype."""
        for pieces in self._pending.values():
            entries, offset = [], 0
            for key, flat in pieces:
                entries.append((key, offset, flat.numel(), flat.shape))
                offset += flat.numel()
            bucket = _Bucket(self.comm.all_gather_async(torch.cat([p for _, p in pieces])),
                             entries)
            for key, *_ in entries:
                self._inflight[key] = bucket
        self._pending.clear()
        self._pending_bytes = 0

    def drain(self) -> None:
        """Send what is queued and wait for everything in flight."""
        self.flush()
        for bucket in list(self._inflight.values()):
            self._unpack(bucket)

    def _others(self, pieces: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """`pieces` without this rank's own (None in its place), so its memory can go."""
        me = self.comm.rank
        return [None if rank == me else p for rank, p in enumerate(pieces)]

    def _unpack(self, bucket: _Bucket) -> None:
        flats = self._others(bucket.handle.wait())
        for key, offset, numel, _ in bucket.entries:
            self.previous[key] = [None if f is None else f[offset:offset + numel] for f in flats]
            self._inflight.pop(key, None)
