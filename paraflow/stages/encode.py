from __future__ import annotations

from typing import Any

from paraflow.families import Conditioning, denoiser_call
from paraflow.graph import StageEnv
from paraflow.models.components import TEXT_ENCODERS


class EncodePrompt:
    """Prompts (one per image) → text conditioning, negative branch first when guidance is on,
    with the run's clip_skip and SDXL micro-conditioning."""

    components = TEXT_ENCODERS

    def __call__(self, env: StageEnv, prompts: list[str]) -> dict[str, Any]:
        call = denoiser_call(env.pipe)
        guidance = call.family.uses_guidance(call.model.config, env.cfg.guidance_scale)
        return {"conditioning": self.encode(env, prompts, guidance)}

    def encode(self, env: StageEnv, prompts: list[str], guidance: bool) -> Conditioning:
        cfg = env.cfg
        family = denoiser_call(env.pipe).family
        return family.encode_prompts(env.pipe, prompts, cfg.negative_prompt, env.device,
                                     guidance, cfg.height, cfg.width,
                                     clip_skip=cfg.get("clip_skip"), micro=cfg.get("sdxl"))
