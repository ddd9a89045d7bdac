"""Image and latent comparisons for parity reports, benchmarks and tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray,
         peak: float | None = None) -> float:
    """PSNR of `a` against the reference `b` in dB; peak: 255 for 8-bit images, else the
    reference's range."""
    a, b = (torch.as_tensor(np.array(x) if isinstance(x, np.ndarray) else x).double()
            for x in (a, b))
    peak = float(b.max() - b.min()) if peak is None else peak
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two 8-bit images (H, W, 3): torchmetrics' Gaussian-window SSIM."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def batch(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].double() / 255  # a copy

    side = min(a.shape[0], a.shape[1])
    kernel = 11 if side >= 11 else side - (1 - side % 2)  # odd, no larger than the image
    value = structural_similarity_index_measure(batch(a), batch(b), data_range=1.0,
                                                kernel_size=kernel)
    return float(value[0] if isinstance(value, tuple) else value)


def seam_score(image: np.ndarray, boundaries: Sequence[int]) -> float:
    """How much sharper the image changes across band boundaries than elsewhere: the mean
    absolute row-to-row difference across the boundary rows over the mean of all other rows.
    About 1 for an image without seams; naive patch parallelism scores high. `boundaries`: the
    first pixel row of every band but the first. NaN without boundaries."""
    grey = np.asarray(image, dtype=np.float64)
    grey = grey.mean(-1) if grey.ndim == 3 else grey
    steps = np.abs(np.diff(grey, axis=0))  # steps[i]: row i+1 against row i
    across = [b - 1 for b in boundaries if 0 < b < grey.shape[0]]
    if not across:
        return math.nan
    mask = np.zeros(steps.shape[0], dtype=bool)
    mask[across] = True
    elsewhere = float(steps[~mask].mean())
    return float(steps[mask].mean()) / max(elsewhere, 1e-12)


def drift(trajectory: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per step: RMS of (trajectory − reference) over RMS of the reference, for latents shaped
    (images, steps, C, h, w)."""
    diff = (trajectory.double() - reference.double()).pow(2).mean(dim=(0, 2, 3, 4)).sqrt()
    scale = reference.double().pow(2).mean(dim=(0, 2, 3, 4)).sqrt().clamp_min(1e-12)
    return [float(v) for v in diff / scale]
