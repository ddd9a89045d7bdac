"""Peak live activation bytes of code run on the meta device, at the granularity of aten ops.

`LiveBytes` is a TorchDispatchMode: every tensor an op returns is counted (by storage, so views
are free) until Python frees it (a weakref finalizer), exactly when the real run would free it,
because the meta run executes the same Python code with the same references. Storages of
parameters and buffers are not activations and are left out. What is not seen: workspace inside
one kernel (fused attention, convolution algorithms) and allocator slack, so the figure is the
peak of what the program holds, as `paraflow.memory.track_live_tensors` measures it on CPU.

One kernel workspace is modelled, because it is large and certain: on CPU (oneDNN) a convolution
copies its input into a blocked layout for the duration of the call (`cpu_convolutions=True`:
measured as input-sized on the tiny VAE's full-resolution convolutions). CUDA's cuDNN workspace
depends on the algorithm chosen at run time and is left out.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CONVOLUTIONS = (torch.ops.aten.conv2d, torch.ops.aten.convolution)


def storage_key(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)


class LiveBytes(TorchDispatchMode):
    """Counts live tensor bytes while active; `peak` is the most seen after any op."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), cpu_convolutions: bool = False
                 ) -> None:
        super().__init__()
        self.cpu_convolutions = cpu_convolutions
        self.excluded = {storage_key(t) for t in exclude}
        self.refs: dict[int, int] = {}  # storage -> live tensor objects on it
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key in self.excluded:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = tensor.untyped_storage().nbytes()
            self.live += self.sizes[key]
        self.refs[key] += 1
        weakref.finalize(tensor, self._release, key)
        self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        if self.cpu_convolutions and func.overloadpacket in CONVOLUTIONS:
            copy = args[0].numel() * args[0].element_size()  # the input, reordered
            self.peak = max(self.peak, self.live + copy)
        return out
