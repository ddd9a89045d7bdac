"""The comparisons of parity reports and benchmarks, on images made to order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paraflow.metrics import drift, psnr, seam_score, ssim


def smooth_image(rows: int = 64, cols: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    grey = 128 + 60 * np.sin(y / 7.0) * np.cos(x / 5.0)
    return np.repeat(grey[..., None], 3, -1).astype(np.uint8)


def test_seam_score_is_about_one_without_seams_and_high_with_them() -> None:
    image = smooth_image()
    plain = seam_score(image, [32])
    seamed = image.copy()
    seamed[32:] = np.clip(seamed[32:].astype(int) + 40, 0, 255).astype(np.uint8)
    print(f"seam score: smooth {plain:.2f}, shifted lower band {seam_score(seamed, [32]):.2f}")
    assert 0.3 < plain < 2.0
    assert seam_score(seamed, [32]) > 5 * plain
    assert math.isnan(seam_score(image, []))


def test_psnr_and_ssim_order_by_damage() -> None:
    image = smooth_image()
    rng = np.random.default_rng(0)
    slight = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(image + rng.normal(0, 30, image.shape), 0, 255).astype(np.uint8)
    assert psnr(image, image, 255.0) == math.inf
    assert psnr(slight, image, 255.0) > psnr(heavy, image, 255.0) + 15
    assert ssim(image, image) == pytest.approx(1.0)
    assert 1.0 > ssim(slight, image) > ssim(heavy, image)


def test_drift_is_relative_rms_per_step() -> None:
    reference = torch.ones(2, 3, 4, 8, 8)
    moved = reference.clone()
    moved[:, 1] += 0.5  # step 1 off by half its RMS, step 2 off by all of it
    moved[:, 2] += 1.0
    assert drift(moved, reference) == pytest.approx([0.0, 0.5, 1.0])
