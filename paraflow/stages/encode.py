from __future__ import annotations

from typing import Any

from paraflow.adapters import encode_prompts, uses_guidance
from paraflow.graph import StageEnv


class EncodePrompt:
    """Prompts (one per image) → text conditioning, negative branch first when guidance is on."""

    components = ("text_encoder", "text_encoder_2")

    def __call__(self, env: StageEnv, prompts: list[str]) -> dict[str, Any]:
        cfg = env.cfg
        conditioning = encode_prompts(
            env.pipe, prompts, cfg.negative_prompt, env.device,
            uses_guidance(env.pipe, cfg.guidance_scale), cfg.height, cfg.width,
        )
        return {"conditioning": conditioning}
