"""Image and latent comparisons for parity reports, benchmarks and tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
    """Structural similarity of two 8-bit images (H, W, 3), as Wang et al. define it and as
    torchmetrics computes it by default (an 11×11 Gaussian window of σ 1.5, reflected edges,
    the mean over the whole image; the same values to 1e-13). Written here because installing
    torchmetrics makes Lightning Fabric import it in every process, about 1 s per start."""
    x, y = (torch.from_numpy(np.array(v)).permute(2, 0, 1)[None].double() / 255 for v in (a, b))
    side, pad = 11, 5
    offsets = torch.arange(side, dtype=torch.float64) - pad
    gauss = torch.exp(-((offsets / 1.5) ** 2) / 2)
    gauss = gauss / gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(x.shape[1], 1, side, side)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window,
                        groups=t.shape[1])

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = (local_mean(x * x) - mu_x ** 2).clamp_min(0)
    var_y = (local_mean(y * y) - mu_y ** 2).clamp_min(0)
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (k · data range)², the range being 1
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return float(index.mean())


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
