"""The step caches' hooks, on diffusers' hook registry (`HookRegistry`, `ModelHook`): each wraps
one block's forward and, on a reused step, answers from the cache instead of running it.

Written here rather than taken from `diffusers.hooks.apply_first_block_cache` because that hook
decides on each process's own tensors (a band strategy's ranks would disagree, and their
collectives with them) and covers transformer blocks only; DeepCache is not in diffusers.

- A transformer (First-Block Cache): the first block always runs; `ResidualHead` decides on
  its residual (output − input) and, reusing, adds the rest's residual cached at the last full
  step; every later block (`ResidualRest`) then passes its input through; on a full step the last
  one records the rest's residual. TaylorSeer (taylorseer.py) uses the same hooks, `scheduled`:
  the step number decides before the call, and the rest's residual added is its forecast.
- A UNet: `ProbeHead` on the first down block decides (first_block), or the step number does
  (deepcache); the skipped blocks (`CachedOutput`) answer with their output of the last full
  step. Everything around them runs, with each rank's own band, so a strategy's exchanges in
  the blocks that run (and its output gather) happen as on any step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from paraflow.comm import Communicator

HOOK = "paraflow_step_cache"


@dataclass
class CacheState:
    """One denoiser's cache, shared by its hooks: whether this step reuses, and what the last
    full step left."""

    threshold: float = 0.0
    comm: Communicator | None = None  # the ranks sharing the image (None: decide alone)
    scheduled: bool = False  # the step number sets `reuse` before the call; no block decides
    active: bool = False  # between a generation's start and end; else every hook passes through
    reuse: bool = False
    previous: torch.Tensor | None = None  # the decision's tensor at the last full step
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # first block's output
    rest: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the rest's residual
    outputs: dict[int, Any] = field(default_factory=dict)  # CachedOutput's, by hook id
    # The planner's stand-in for the comparison in `decide` (paraflow/plan/cache.py): meta
    # tensors hold no values, so it answers from the planned hit rate once the sums are
    # all-reduced (and their bytes booked). None (every run): compare the sums.
    verdict: Callable[[torch.Tensor], bool] | None = None

    def start(self, threshold: float, comm: Communicator | None,
              scheduled: bool = False) -> None:
        """A new generation: nothing cached."""
        self.stop()
        self.threshold, self.comm, self.active = threshold, comm, True
        self.scheduled = scheduled

    def stop(self) -> None:
        """The generation is done: drop what it cached; the hooks pass through."""
        self.active, self.reuse = False, False
        self.previous = self.head = self.rest = None
        self.outputs.clear()

    def remember(self, probe: torch.Tensor) -> bool:
        """A full step with nothing cached yet: `probe` is what the next step compares with."""
        self.previous = probe
        return False

    def decide(self, probe: torch.Tensor) -> bool:
        """Reuse when `probe` moved less than the threshold (relative L1) since the last full
        step, summed over the ranks sharing the image: they decide as one device would."""
        if self.previous is None or self.previous.shape != probe.shape or self.threshold <= 0:
            self.previous = probe
            return False
        sums = torch.stack([(probe - self.previous).abs().sum(),
                            self.previous.abs().sum()]).double()
        if self.comm is not None and self.comm.world_size > 1:
            sums = self.comm.all_reduce(sums)
        reuse = bool(sums[0] < self.threshold * sums[1]) if self.verdict is None \
            else self.verdict(sums)
        if not reuse:
            self.previous = probe
        return reuse


@functools.cache
def _signature(block_class: Any) -> inspect.Signature:
    return inspect.signature(block_class.forward)


def _hidden_and_text(module: nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A transformer block's hidden_states and encoder_hidden_states arguments."""
    block_class: Any = type(module)
    bound = _signature(block_class).bind(module, *args, **kwargs)
    given = bound.arguments
    return given["hidden_states"], given.get("encoder_hidden_states")


Split = Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]]
Join = Callable[[Any, torch.Tensor, torch.Tensor | None], Any]


class ForwardHook(ModelHook):
    """diffusers' hook with the wrapped forward typed."""

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn_ref.original_forward(*args, **kwargs)  # type: ignore[misc]


class ResidualHead(ForwardHook):
    def __init__(self, state: CacheState, split: Split, join: Join) -> None:
        super().__init__()
        self.state, self.split, self.join = state, split, join

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if not state.active:
            return self.original(*args, **kwargs)
        if state.scheduled:  # decided already; `rest` is what to add (a forecast)
            out = self.original(*args, **kwargs)
            hidden, text = self.split(out)
        else:
            hidden_in, _ = _hidden_and_text(module, args, kwargs)
            out = self.original(*args, **kwargs)
            hidden, text = self.split(out)
            residual = hidden - hidden_in
            state.reuse = state.decide(residual) if state.rest is not None \
                else state.remember(residual)
        if state.reuse and state.rest is not None:
            rest_hidden, rest_text = state.rest
            text = text + rest_text if text is not None and rest_text is not None else text
            return self.join(out, hidden + rest_hidden, text)
        state.head = (hidden, text)
        return out


class ResidualRest(ForwardHook):
    def __init__(self, state: CacheState, split: Split, join: Join, last: bool) -> None:
        super().__init__()
        self.state, self.split, self.join, self.last = state, split, join, last
        self.like: Any = None  # the block's output on a full step: its structure, reused

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.active and state.reuse:
            hidden, text = _hidden_and_text(module, args, kwargs)
            return self.join(self.like, hidden, text)
        out = self.original(*args, **kwargs)
        if not state.active:
            return out
        self.like = out
        if self.last and state.head is not None:
            hidden, text = self.split(out)
            head_hidden, head_text = state.head
            state.rest = (hidden - head_hidden,
                          text - head_text if text is not None and head_text is not None
                          else None)
        return out


class ProbeHead(ForwardHook):
    """A UNet's first down block: its output decides whether the rest is reused."""

    def __init__(self, state: CacheState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.original(*args, **kwargs)
        state = self.state
        if state.active:
            hidden = out[0] if isinstance(out, tuple) else out
            state.reuse = state.decide(hidden) if state.outputs else state.remember(hidden)
        return out


class CachedOutput(ForwardHook):
    """A block skipped on reused steps: its output of the last full step."""

    def __init__(self, state: CacheState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        key, state = id(self), self.state
        if state.active and state.reuse and key in state.outputs:
            return state.outputs[key]
        out = self.original(*args, **kwargs)
        if state.active:
            state.outputs[key] = out
        return out


def install(module: nn.Module, hook: ModelHook) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK)


def installed(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(HOOK) is not None


def remove(module: nn.Module) -> None:
    if installed(module):
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK, recurse=False)
