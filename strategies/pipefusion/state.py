"""What a PipeFusion stage's layers share: the patch being run, whether this step is a warm-up,
each attention layer's keys/values of the whole image (the displaced buffer), and the links to
the neighbouring stages.

The buffer: a layer keeps the image tokens' keys/values it last saw, per patch. A warm-up step
runs the whole image as one patch, so every layer's buffer is fresh and the step equals one
device. After warm-up each patch attends over its own fresh keys/values and the buffer's for the
others — the patches before it at this step, the ones after it at the previous step — and then
replaces its own part of the buffer. The buffer of a layer lives on the stage holding the layer:
every patch passes through it, so keys/values never travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paraflow.comm import SendHandle
from paraflow.strategies.patch.state import PatchState


@dataclass
class PipeState(PatchState):
    """PatchState's band plan (`plan`: the patches of the call, `index` the one running) and
    text-token count, with the pipeline's own: `comm` is the stages' communicator (stage =
    rank), `warmup_steps` the synchronous steps first."""

    kv: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → whole-image K/V
    warm: bool = True  # this step runs the whole image as one patch
    filled: bool = False  # a warm-up step has filled the buffers of this generation
    _sends: list[tuple[SendHandle, torch.Tensor]] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return self.comm.rank

    @property
    def stages(self) -> int:
        return self.comm.world_size

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def begin_step(self, step: int) -> None:
        """Whole image at the warm-up steps, and at any step before the buffers are filled."""
        self.step = step
        self.warm = step < self.warmup_steps or not self.filled

    def end_step(self) -> None:
        """The step's calls are done: wait for the sends (their tensors may go)."""
        for handle, _ in self._sends:
            handle.wait()
        self._sends.clear()
        self.filled = True

    def reset(self) -> None:
        """The generation is done: drop the buffers (they do not sit beside the decode)."""
        self.end_step()
        self.kv.clear()
        self.filled = False

    def send(self, tensor: torch.Tensor) -> None:
        """To the next stage, asynchronously (waited at the step's end)."""
        tensor = tensor.contiguous()
        self._sends.append((self.comm.send_async(tensor, self.stage + 1), tensor))

    def receive(self, like: torch.Tensor) -> torch.Tensor:
        """From the previous stage: a tensor shaped as `like` (this stage's own input)."""
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return self.comm.recv(out, self.stage - 1)

    def whole_image(self, key: str, kv: torch.Tensor) -> torch.Tensor:
        """(B, patch tokens, 2D) fresh → (B, image tokens, 2D): the buffer with this patch's
        part replaced, kept as the layer's new buffer."""
        counts = self.band.scaled(kv.shape[1])
        start = sum(counts[: self.band.index])
        previous = self.kv.get(key)
        if previous is None or previous.shape[1] != sum(counts):
            if len(counts) > 1:
                raise RuntimeError(f"no keys/values of the whole image for layer {key} (the "
                                   "first step of a generation must run the whole image)")
            whole = kv
        else:
            whole = torch.cat([previous[:, :start], kv, previous[:, start + kv.shape[1]:]], 1)
        self.kv[key] = whole
        return whole
