from __future__ import annotations

from typing import Any

from paraflow.adapters import TEXT_ENCODERS, encode_prompts, uses_guidance
from paraflow.graph import StageEnv


class EncodePrompt:
    """Prompts (one per image) → text conditioning, negative branch first when guidance is on."""

    components = TEXT_ENCODERS

    def __call__(self, env: StageEnv, prompts: list[str]) -> dict[str, Any]:
        cfg = env.cfg
        conditioning = encode_prompts(
            env.pipe, prompts, cfg.negative_prompt, env.device,
            uses_guidance(env.pipe, cfg.guidance_scale), cfg.height, cfg.width,
        )
        return {"conditioning": conditioning}
