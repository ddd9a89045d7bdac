"""The displaced GroupNorm estimators on hand-made band statistics (no processes), against the
DistriFusion paper's equations written out here directly from the data; and conv_in, whose input
every rank holds, exact under displaced patch after warm-up (2 gloo ranks).

Tolerance: 1e-9 on float64 moments (the same sums, added in another order).
"""

from __future__ import annotations

import pytest
import torch

from paraflow.api import compose
from paraflow.strategies.patch.groupnorm import estimate_moments
from paraflow.strategies.schemas import GroupNormMode
from tests import workers
from tests.pools import run_pooled

TOL = 1e-9


def _sums(x: torch.Tensor) -> torch.Tensor:
    """(B, G, n) data → (B, G, 2) sum and sum of squares, as PatchGroupNorm sends them."""
    return torch.stack([x.sum(-1), (x * x).sum(-1)], dim=-1)


def _bands(seed: int) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """Three bands of unequal size at the previous step, and band 1's data now (shifted and
    rescaled: the change the correction must carry)."""
    gen = torch.Generator().manual_seed(seed)
    counts = [48, 32, 16]
    previous = [torch.randn(2, 3, n, generator=gen, dtype=torch.float64) for n in counts]
    fresh = previous[1] * 1.5 + 0.7 + 0.1 * torch.randn(2, 3, 32, generator=gen,
                                                         dtype=torch.float64)
    return previous, fresh, counts


def test_corrected_async_is_the_papers_formula() -> None:
    previous, fresh, counts = _bands(0)
    stale = [_sums(p) for p in previous]
    mean, var = estimate_moments(GroupNormMode.corrected_async, stale, _sums(fresh), stale[1],
                                 1, counts)
    # The paper: E[A_t] ≈ E[A_{t+1}] + (E[A_t^(i)] − E[A_{t+1}^(i)]), for A and A², global
    # previous moments over the whole previous image, local ones over this band.
    whole = torch.cat(previous, dim=-1)
    ex = whole.mean(-1) + (fresh.mean(-1) - previous[1].mean(-1))
    ex2 = (whole**2).mean(-1) + ((fresh**2).mean(-1) - (previous[1] ** 2).mean(-1))
    assert torch.allclose(mean, ex, atol=TOL, rtol=0)
    assert torch.allclose(var, ex2 - ex**2, atol=TOL, rtol=0)
    assert (ex2 - ex**2 > 0).all()  # no fallback in this case


def test_weighted_and_stale_estimators_and_they_differ_from_the_paper() -> None:
    previous, fresh, counts = _bands(1)
    stale = [_sums(p) for p in previous]
    args = (stale, _sums(fresh), stale[1], 1, counts)
    corrected = estimate_moments(GroupNormMode.corrected_async, *args)
    weighted = estimate_moments(GroupNormMode.weighted, *args)
    old = estimate_moments(GroupNormMode.stale, *args)
    mixed = torch.cat([previous[0], fresh, previous[2]], dim=-1)  # the others' old, mine new
    assert torch.allclose(weighted[0], mixed.mean(-1), atol=TOL, rtol=0)
    assert torch.allclose(weighted[1], mixed.var(-1, unbiased=False), atol=TOL, rtol=0)
    whole = torch.cat(previous, dim=-1)
    assert torch.allclose(old[0], whole.mean(-1), atol=TOL, rtol=0)
    assert torch.allclose(old[1], whole.var(-1, unbiased=False), atol=TOL, rtol=0)
    # weighted = previous global + the correction × this band's share (32/96): not the paper
    share = counts[1] / sum(counts)
    assert torch.allclose(weighted[0] - old[0], (corrected[0] - old[0]) * share, atol=TOL)
    assert (weighted[0] - corrected[0]).abs().min() > 0.1


def test_negative_variance_keeps_the_corrected_mean_and_uses_the_band_variance() -> None:
    gen = torch.Generator().manual_seed(2)
    counts = [64, 64]
    quiet = 0.1 * torch.randn(1, 2, 64, generator=gen, dtype=torch.float64)
    loud = 3.0 * torch.randn(1, 2, 64, generator=gen, dtype=torch.float64)  # my band, before
    fresh = 0.1 * torch.randn(1, 2, 64, generator=gen, dtype=torch.float64) + 0.5  # and now
    stale = [_sums(quiet), _sums(loud)]
    mean, var = estimate_moments(GroupNormMode.corrected_async, stale, _sums(fresh), stale[1],
                                 1, counts)
    whole = torch.cat([quiet, loud], dim=-1)
    ex = whole.mean(-1) + fresh.mean(-1) - loud.mean(-1)
    ex2 = (whole**2).mean(-1) + (fresh**2).mean(-1) - (loud**2).mean(-1)
    assert (ex2 - ex**2 < 0).all()  # the estimate is unusable here
    assert torch.allclose(mean, ex, atol=TOL, rtol=0)
    assert torch.allclose(var, fresh.var(-1, unbiased=False), atol=TOL, rtol=0)


def test_sync_and_separate_take_no_previous_statistics() -> None:
    previous, fresh, counts = _bands(3)
    stale = [_sums(p) for p in previous]
    for mode in (GroupNormMode.sync, GroupNormMode.separate):
        with pytest.raises(ValueError, match=mode.value):
            estimate_moments(mode, stale, _sums(fresh), stale[1], 1, counts)


@pytest.mark.slow
def test_conv_in_is_exact_after_warmup_under_displaced_patch() -> None:
    cfg = compose(["model=tiny_random", "+strategy=displaced_patch", "strategy.warmup_steps=1",
                   "launcher.devices=2", "launcher.threads_per_rank=1"])
    report = run_pooled(cfg, workers.conv_in_after_warmup)
    print("conv_in per step (rank 0):", report)
    for step in report:
        assert step["error"] <= 1e-6
    assert all(step["stale_distance"] > 0.1 for step in report[1:])
