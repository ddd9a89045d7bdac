"""The transformer's blocks in N consecutive stages, one per rank of the pipeline.

The blocks are the family's residual stream (Family.cache_blocks: every block list in the order
they run, e.g. Flux's double- then single-stream blocks). Stage s keeps blocks [b_s, b_s+1) and
drops the rest from their ModuleLists, so its parameter bytes fall to its share of the blocks
plus what every rank keeps: the embedders (patch, time and text embedding) and the output norm
and projection, which are small and which every stage runs (time and text embeddings feed every
block; the output layers run on the last stage only, the others stop before them).

Communicated, per patch, from stage s to s + 1 (point to point): the inputs of block b_s+1 —
the image tokens, and the text tokens where the block's attention is joint (the text stream
flows through the stages too); a plain block's text (PixArt's cross-attention context) is every
rank's own. Stage s > 0 takes its first block's inputs from the message instead of the
embedders' output; stage s < N − 1 ends at a stand-in for block b_s+1 that sends its inputs and
stops the model's forward (StageDone), so nothing after the stage runs there.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from paraflow.families.base import Family, self_attention_modules
from paraflow.strategies.pipefusion.state import PipeState

HOOK = "paraflow_pipefusion"


class StageDone(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by StageEnd: this stage's part of the model call is done."""


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_bounds(weights: list[int], stages: int) -> list[int]:
    """Block indices b_0 = 0 < b_1 < … < b_N = len(weights): consecutive stages of at least one
    block each, the heaviest stage as light as it can be (weights: each block's parameters)."""
    blocks = len(weights)
    if not 1 <= stages <= blocks:
        raise ValueError(f"{stages} stages of {blocks} blocks")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    @functools.cache
    def best(start: int, left: int) -> tuple[int, tuple[int, ...]]:
        """(heaviest stage, cuts after `start`) for blocks [start, blocks) in `left` stages."""
        if left == 1:
            return prefix[blocks] - prefix[start], ()
        options = []
        for cut in range(start + 1, blocks - left + 2):
            rest, cuts = best(cut, left - 1)
            options.append((max(prefix[cut] - prefix[start], rest), (cut, *cuts)))
        return min(options)

    return [0, *best(0, stages)[1], blocks]


def joint(block: nn.Module, family: Family) -> bool:
    """The block's attention mixes text in (its text stream flows to the next block)."""
    return any(family.attention_kind(m) != "plain" for _, m in self_attention_modules(block))


@functools.cache
def _signature(block_class: Any) -> inspect.Signature:
    return inspect.signature(block_class.forward)


def _bound(signature: inspect.Signature, module: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> inspect.BoundArguments:
    return signature.bind(module, *args, **kwargs)


class ForwardHook(ModelHook):
    """diffusers' hook with the wrapped forward typed."""

    def original(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn_ref.original_forward(*args, **kwargs)  # type: ignore[misc]


class StageStart(ForwardHook):
    """Stage s > 0's first block: its image (and joint text) inputs come from stage s − 1."""

    def __init__(self, state: PipeState, text: bool) -> None:
        super().__init__()
        self.state, self.text = state, text

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        block_class: Any = type(module)
        bound = _bound(_signature(block_class), module, args, kwargs)
        given = bound.arguments
        given["hidden_states"] = self.state.receive(given["hidden_states"])
        if self.text:
            given["encoder_hidden_states"] = self.state.receive(given["encoder_hidden_states"])
        return self.original(*bound.args[1:], **bound.kwargs)


class StageEnd(nn.Module):
    """Stage s < N − 1's stand-in for block b_s+1 (no weights): sends that block's image (and
    joint text) inputs to stage s + 1, then stops the forward."""

    def __init__(self, state: PipeState, block_class: Any, text: bool) -> None:
        super().__init__()
        self.state, self.text = state, text
        self.signature = _signature(block_class)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        given = _bound(self.signature, self, args, kwargs).arguments
        self.state.send(given["hidden_states"])
        if self.text:
            self.state.send(given["encoder_hidden_states"])
        raise StageDone


@dataclass
class BlockSlot:
    """Where a block sits: its ModuleList's name in the model, and its index there."""

    list_name: str
    index: int


def block_slots(model: nn.Module, blocks: list[nn.Module]) -> list[BlockSlot]:
    names = {id(m): n for n, m in model.named_modules()}
    slots = []
    for block in blocks:
        parent, _, index = names[id(block)].rpartition(".")
        slots.append(BlockSlot(parent, int(index)))
    return slots


def keep_stage(model: nn.Module, family: Family, state: PipeState, stage: int,
               stages: int) -> tuple[int, int]:
    """Cut `model` to stage `stage` of `stages` in place; returns its blocks [first, stop) of
    the whole sequence."""
    blocks = family.cache_blocks(model)
    bounds = stage_bounds([parameter_count(b) for b in blocks], stages)
    first, stop = bounds[stage], bounds[stage + 1]
    slots = block_slots(model, blocks)
    kept: dict[str, list[nn.Module]] = {slot.list_name: [] for slot in slots}
    for i in range(first, stop):
        kept[slots[i].list_name].append(blocks[i])
    if stop < len(blocks):
        after = blocks[stop]
        kept[slots[stop].list_name].append(StageEnd(state, type(after), joint(after, family)))
    if stage > 0:
        registry = HookRegistry.check_if_exists_or_initialize(blocks[first])
        registry.register_hook(StageStart(state, joint(blocks[first], family)), HOOK)
    for name, modules in kept.items():  # the other blocks go: their memory with them
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.ModuleList(modules))
    return first, stop


def block_count(model: nn.Module, family: Family) -> int:
    return len(family.cache_blocks(model))

