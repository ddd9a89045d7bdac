"""The communicator: every collective paraflow issues goes through here, so bytes are counted once.

Bytes are what this rank puts on the wire under a ring algorithm: an all-gather of an n-byte
piece sends n·(W−1); an all-reduce of n bytes sends 2·n·(W−1)/W; a broadcast from the source
sends n·(W−1) (other ranks 0). They are kept per denoising step (`step`, set by the loop) and in
total; bookkeeping outside the loop is counted under step None. A subgroup communicator
(`split`) counts into its parent's books, under the parent's step.

A link model (`LinkModel`, `launcher.link`) adds bytes / bandwidth + latency of wall time to each
transfer, on a serial link clock: a synchronous collective sleeps it out before returning, an
asynchronous one only when its handle is waited (the sleep uses no core, as a copy engine would).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class LinkModel:
    """A modeled interconnect: `bandwidth` bytes/s and `latency_s` per message."""

    bandwidth: float
    latency_s: float

    def __post_init__(self) -> None:
        self._free_at = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: float) -> float:
        """Book a transfer on the link; return the wall-clock time it completes."""
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + nbytes / self.bandwidth + self.latency_s
            return self._free_at

    @staticmethod
    def wait_until(deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def label(self) -> str:
        return f"modeled: {self.bandwidth / 1e9:g} GB/s, {self.latency_s * 1e6:g} us/message"


class GatherHandle:
    """An all-gather in flight; `wait()` returns every rank's piece in rank order."""

    def __init__(self, work: Any, pieces: list[torch.Tensor], deadline: float | None) -> None:
        self._work, self._pieces, self._deadline = work, pieces, deadline
        self.done = False

    def wait(self) -> list[torch.Tensor]:
        if not self.done:
            if self._work is not None:
                self._work.wait()
            if self._deadline is not None:
                LinkModel.wait_until(self._deadline)
            self.done = True
        return self._pieces


class ShiftHandle:
    """A ring shift in flight; `wait()` returns the tensor the previous rank sent."""

    def __init__(self, works: list[Any], received: torch.Tensor,
                 deadline: float | None) -> None:
        self._works, self._received, self._deadline = works, received, deadline

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works = []
        if self._deadline is not None:
            LinkModel.wait_until(self._deadline)
            self._deadline = None
        return self._received


class SendHandle:
    """A point-to-point send in flight; `wait()` returns once the tensor has left."""

    def __init__(self, work: Any, deadline: float | None) -> None:
        self._work, self._deadline = work, deadline

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._deadline is not None:
            LinkModel.wait_until(self._deadline)
            self._deadline = None


class Communicator:
    def __init__(self, group: dist.ProcessGroup | None, world_size: int, rank: int,
                 link: LinkModel | None = None, parent: Communicator | None = None,
                 timeout: timedelta | None = None) -> None:
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.link = link
        self.parent = parent
        self.timeout = timeout  # for the subgroups `split` makes (None: torch's default)
        self._step: int | None = None
        self._bytes_by_step: dict[int | None, int] = defaultdict(int)
        self._calls = 0
        # Bytes and calls counted inside compiled graphs (paraflow/compile.py), not yet booked.
        self._compiled = torch.zeros(2, dtype=torch.int64)

    @property
    def step(self) -> int | None:
        return self._step

    @step.setter
    def step(self, value: int | None) -> None:
        self._book_compiled()  # what compiled code sent belongs to the step that ends
        self._step = value

    @property
    def bytes_by_step(self) -> dict[int | None, int]:
        self._book_compiled()
        return self._bytes_by_step

    @property
    def calls(self) -> int:
        self._book_compiled()
        return self._calls

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_step.values())

    def _count(self, nbytes: float) -> float | None:
        """Book `nbytes`; return the modeled link's completion time (None: real transport)."""
        if self.parent is not None:
            return self.parent._count(nbytes)
        if torch.compiler.is_compiling():
            # A compiled graph would bake a Python counter in as a constant (and recompile on
            # each change): it adds to a tensor instead, booked when the step changes. A
            # modeled link cannot be slept out in a graph (refused before launch).
            self._compiled[0] += int(nbytes)
            self._compiled[1] += 1
            return None
        self._bytes_by_step[self._step] += int(nbytes)
        self._calls += 1
        return self.link.reserve(nbytes) if self.link is not None else None

    def book(self, nbytes: float) -> None:
        """Count `nbytes` a library sent over this communicator's group itself (FSDP2's
        all-gathers, strategies/patch/shard.py), and wait them out on a modeled link."""
        self._settle(self._count(nbytes))

    def _book_compiled(self) -> None:
        if self.parent is None and bool(self._compiled.any()):
            nbytes, calls = self._compiled.tolist()
            self._bytes_by_step[self._step] += nbytes
            self._calls += calls
            self._compiled.zero_()

    @staticmethod
    def _settle(deadline: float | None) -> None:
        if deadline is not None:
            LinkModel.wait_until(deadline)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(pieces, tensor, group=self.group)
        self._settle(self._count(tensor.numel() * tensor.element_size() * (self.world_size - 1)))
        return pieces

    def all_gather_async(self, tensor: torch.Tensor) -> GatherHandle:
        """Start an all-gather of `tensor` (same shape on all ranks); wait on the handle."""
        if self.world_size == 1:
            return GatherHandle(None, [tensor], None)
        tensor = tensor.contiguous()
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = dist.all_gather(pieces, tensor, group=self.group, async_op=True)
        deadline = self._count(tensor.numel() * tensor.element_size() * (self.world_size - 1))
        return GatherHandle(work, pieces, deadline)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place, and return it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
            nbytes = tensor.numel() * tensor.element_size()
            self._settle(self._count(2 * nbytes * (self.world_size - 1) / self.world_size))
        return tensor

    def all_to_all(self, pieces: Sequence[torch.Tensor],
                   shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Send pieces[j] to rank j; return what each rank i sent here, of shapes[i]. One
        all_to_all_single over a flat buffer, so pieces may differ in shape (gloo's list
        form requires equal ones)."""
        if self.world_size == 1:
            return [pieces[0].reshape(shapes[0])]
        send = torch.cat([p.reshape(-1) for p in pieces])
        out_counts = [math.prod(shape) for shape in shapes]
        recv = send.new_empty(sum(out_counts))
        dist.all_to_all_single(recv, send, out_counts, [p.numel() for p in pieces],
                               group=self.group)
        sent = send.numel() - pieces[self.rank].numel()
        self._settle(self._count(sent * send.element_size()))
        return [chunk.view(*shape) for chunk, shape in zip(recv.split(out_counts), shapes)]

    def shift_async(self, tensor: torch.Tensor, recv_shape: Sequence[int]) -> ShiftHandle:
        """Start sending `tensor` to the next rank of the ring (rank + 1) while receiving a
        `recv_shape` tensor from the previous one (point to point: ring attention's hop)."""
        if self.world_size == 1:
            return ShiftHandle([], tensor, None)
        tensor = tensor.contiguous()
        received = tensor.new_empty(tuple(recv_shape))
        after, before = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, group=self.group, group_peer=after),
            dist.P2POp(dist.irecv, received, group=self.group, group_peer=before)])
        deadline = self._count(tensor.numel() * tensor.element_size())
        return ShiftHandle(list(works), received, deadline)

    def send_async(self, tensor: torch.Tensor, peer: int) -> SendHandle:
        """Start sending `tensor` to rank `peer` of this communicator (point to point: a
        pipeline stage's hop to the next); the tensor must stay untouched until waited."""
        if peer == self.rank:
            raise ValueError(f"rank {peer} sends to itself")
        tensor = tensor.contiguous()
        work = dist.isend(tensor, group=self.group, group_dst=peer)
        return SendHandle(work, self._count(tensor.numel() * tensor.element_size()))

    def recv(self, out: torch.Tensor, peer: int) -> torch.Tensor:
        """Receive into `out` (contiguous, the sent tensor's shape and dtype) what rank `peer`
        sends; blocking. The sender counts the bytes."""
        dist.recv(out, group=self.group, group_src=peer)
        return out

    def broadcast(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """`tensor` of rank `source` on every rank, in place (the others' `tensor` is the
        buffer: same shape and dtype); the source counts n·(W−1) bytes."""
        if self.world_size > 1:
            dist.broadcast(tensor, group=self.group, group_src=source)
            nbytes = tensor.numel() * tensor.element_size()
            self._settle(self._count(nbytes * (self.world_size - 1)) if self.rank == source
                         else None)
        return tensor

    def all_gather_uneven(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors whose first dimension differs between ranks (others must match)."""
        if self.world_size == 1:
            return [tensor]
        sizes = self.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device))
        counts = [int(s.item()) for s in sizes]
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        return [piece[:count] for piece, count in zip(self.all_gather(padded), counts)]

    def split(self, groups: Sequence[Sequence[int]]) -> Communicator:
        """Partition the ranks into `groups` (global ranks; every rank calls this with the same
        list) and return the communicator of the group holding this rank."""
        mine: Communicator | None = None
        for ranks in groups:
            members = [int(r) for r in ranks]
            group = (dist.new_group(members, timeout=self.timeout) if self.world_size > 1
                     else None)
            if self.rank in members:
                size = len(members)
                mine = Communicator(group if size > 1 else None, size, members.index(self.rank),
                                    parent=self, timeout=self.timeout)
        if mine is None:
            raise ValueError(f"rank {self.rank} is in none of the groups {list(groups)}")
        return mine

    def along(self, make_group: Callable[[], dist.ProcessGroup], members: Sequence[int],
              rank: int) -> Communicator:
        """The communicator over `members` (ranks of this communicator; `rank` is this rank's
        place among them) on the process group `make_group` returns, one that exists already (a
        mesh dimension's). Not collective."""
        size = len(members)
        return Communicator(make_group() if size > 1 else None, size, rank, parent=self,
                            timeout=self.timeout)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Small Python objects (run statistics) from every rank; not counted as traffic."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
