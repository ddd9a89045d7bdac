"""The pipeline components paraflow places and loads, by diffusers' names, and a fix-up applied
to every loaded pipeline."""

from __future__ import annotations

from typing import Any

from transformers import CLIPTextModel

# Every pipeline's text encoders by component name (SDXL's second CLIP, SD3's CLIPs and T5, Flux's
# CLIP and T5): what the encode stage places and what prompt embeddings depend on.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def alias_flattened_clip(pipe: Any) -> Any:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model` inside), which diffusers' SD
    pipelines still read for clip_skip's final layer norm (diffusers#14124): point the old name
    at the model itself. A plain attribute, not a submodule, so weights, state dicts and `.to()`
    are untouched."""
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, CLIPTextModel) and not hasattr(encoder, "text_model"):
            object.__setattr__(encoder, "text_model", encoder)
    return pipe
