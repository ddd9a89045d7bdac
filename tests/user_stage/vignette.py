"""A stage written outside paraflow: darkens the image towards its corners. It declares what
it uses (no pipeline components), reads its own setting from the stage config's `options`,
checks it before launch, and returns its declared output."""

from __future__ import annotations

from typing import Any

import torch


class Vignette:
    components = ()  # pipeline parts it uses (e.g. ("vae",)), placed under the stage's policy

    @staticmethod
    def check(cfg: Any, spec: Any) -> None:
        """Before any rank starts: a bad setting is refused with a message naming it."""
        amount = spec.options.get("amount", 0.5)
        if not 0 <= amount <= 1:
            from paraflow.errors import ParaflowError

            raise ParaflowError(f"pipeline.stages.vignette.options.amount={amount}: use 0..1")

    def __call__(self, env: Any, pixels: torch.Tensor) -> dict[str, Any]:
        amount = float(env.spec.options.get("amount", 0.5))
        return {"vignetted": vignette(pixels, amount)}


def vignette(pixels: torch.Tensor, amount: float) -> torch.Tensor:
    """Pixels in [-1, 1], (B, 3, H, W): brightness scaled by 1 − amount · r², r = 1 in the
    corners."""
    rows = torch.linspace(-1, 1, pixels.shape[-2]).view(-1, 1)
    cols = torch.linspace(-1, 1, pixels.shape[-1]).view(1, -1)
    scale = 1 - amount * (rows ** 2 + cols ** 2) / 2
    return (pixels.clamp(-1, 1) + 1) * scale.to(pixels) - 1
