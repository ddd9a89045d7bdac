"""Pure band / halo index math of patch parallelism (no processes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paraflow.errors import ParaflowError
from paraflow.strategies.patch.bands import (
    BandPlan,
    band_sizes,
    check_layout,
    conv_halo,
    conv_keeps_bands,
    halo_sources,
)


def test_band_sizes_even_uneven_and_units() -> None:
    assert band_sizes(8, 2, 4) == [4, 4]
    assert band_sizes(12, 2, 4) == [8, 4]  # 3 blocks of 4 rows: larger band first
    assert band_sizes(12, 3, 4) == [4, 4, 4]
    assert band_sizes(10, 3) == [4, 3, 3]
    assert sum(band_sizes(128, 3, 4)) == 128
    with pytest.raises(ParaflowError):
        band_sizes(4, 2, 4)  # one block cannot make two bands


def test_check_layout_names_valid_heights() -> None:
    check_layout(96, 8, 3, 4)  # 12 latent rows, 3 bands of 4
    with pytest.raises(ParaflowError, match=r"valid heights .*96, 128"):
        check_layout(64, 8, 3, 4)
    with pytest.raises(ParaflowError, match=r"downsampling \(4\)"):
        check_layout(72, 8, 2, 4)  # 9 latent rows


@pytest.mark.parametrize("kernel,stride,padding,expected", [
    (3, 1, 1, (1, 1)), (3, 2, 1, (1, 0)), (5, 1, 2, (2, 2)), (1, 1, 0, (0, 0))])
def test_conv_halo(kernel: int, stride: int, padding: int, expected: tuple[int, int]) -> None:
    assert conv_halo(kernel, stride, padding) == expected
    assert conv_keeps_bands(16, kernel, stride, padding)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 2)])
def test_halo_rows_reproduce_the_full_convolution(kernel: int, stride: int, padding: int) -> None:
    """Band convolution with the halo rows the math asks for equals the full convolution's rows
    (tolerance 1e-5: the same sums, possibly by a different kernel)."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 12, 5), torch.randn(3, 2, kernel, kernel)
    full = F.conv2d(x, w, stride=stride, padding=padding)
    top, bottom = conv_halo(kernel, stride, padding)
    sizes = band_sizes(12, 3, 2)
    for index in range(3):
        plan = BandPlan(tuple(sizes), index)
        above, below = halo_sources(sizes, index, top, bottom)
        lo, hi = plan.start - top, plan.stop + bottom
        padded = F.pad(x, (0, 0, top, bottom))  # rows outside the image are the conv's zeros
        ext = padded[..., lo + top:hi + top, :]
        assert above == (top if index else 0) and below == (bottom if index < 2 else 0)
        out = F.conv2d(ext, w, stride=stride, padding=(0, padding))
        expected = full[..., plan.start // stride:plan.stop // stride, :]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_plan_scales_with_level() -> None:
    plan = BandPlan((8, 4), 1)
    assert (plan.start, plan.stop) == (8, 12)
    assert plan.scaled(2) == [4, 2]  # two levels down
    assert plan.scaled(16 * 3) == [96, 48]  # tokens: rows × width scale together
    with pytest.raises(ParaflowError):
        BandPlan((8, 4), 0).scaled(3)
