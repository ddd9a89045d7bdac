"""Self-attention of one patch over the whole image in a PipeFusion stage.

Split: the query tokens (the patch running). Communicated: nothing — the other patches' keys and
values come from this layer's buffer on this stage (PipeState.whole_image: fresh on warm-up
steps, displaced after). The processors are the patch strategies' (plain and joint text-image
attention, strategies/patch/attention.py and joint.py), with the exchange of keys/values swapped
for the buffer; the text tokens are the patch's own pass's, fresh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paraflow.families.base import Family, set_self_attention_processors
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor
from paraflow.strategies.patch.joint import band_processor
from paraflow.strategies.pipefusion.state import PipeState


class PipeAttnProcessor(PatchSelfAttnProcessor):
    def __init__(self, state: PipeState, key: str) -> None:
        super().__init__(state, key)
        self.pipe = state

    def _whole_image(self, kv: torch.Tensor) -> torch.Tensor:
        return self.pipe.whole_image(self.key, kv)


def install_processors(model: nn.Module, family: Family, state: PipeState) -> int:
    """The stage's self-attention modules (of the blocks it kept) → patch processors over the
    buffer; cross-attention keeps its own. Returns how many."""
    def make(name: str, module: Any) -> Any:
        return band_processor(family.attention_kind(module), PipeAttnProcessor(state, name))

    return set_self_attention_processors(model, make)
