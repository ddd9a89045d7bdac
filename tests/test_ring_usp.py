"""Ring attention, USP (Ulysses × Ring) and Ulysses with uneven head shares against one device:
tiny PixArt-Σ and -α, SD3, Flux and the UNet (ring) on 2, 3 and 4 gloo ranks, uneven bands,
head counts that do not divide by the ranks (PixArt-Σ's 4 heads over 3, PixArt-α's 3 over 2 and
4 — one rank with no head at all; the ring is the same code for any head count), the guidance
split and data replicas. Tolerance: 1e-4 max abs difference of the
final fp32 latents, images within 1 grey level (the ring's merge by log-sum-exp reorders the
softmax's sums, so not bit-identical). The fast tier checks the merge itself, the degrees and
the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from paraflow.api import compose
from paraflow.attention import attend_with_lse
from paraflow.errors import ParaflowError
from paraflow.registry import build_strategy
from paraflow.strategies.patch.ring import _Merged
from paraflow.strategies.patch.ulysses import head_shares
from paraflow.strategies.usp import usp_degrees
from paraflow.validate import validate
from tests.patch_helpers import check_exact, latents, run_against_one_device

RING, ULYSSES, CFG = ["+strategy=ring"], ["+strategy=ulysses"], ["strategy.cfg_split=true"]
USP22 = ["+strategy=usp", "strategy.ulysses_degree=2", "strategy.ring_degree=2"]
AS_ALPHA = ["model.arch=pixart_alpha", "model.transformer.sample_size=128",
            "model.transformer.use_additional_conditions=true",
            "model.transformer.num_attention_heads=3", "model.transformer.cross_attention_dim=24"]
MODELS = {"pixart": "tiny_pixart_random", "sd3": "tiny_sd3_random", "flux": "tiny_flux_random"}


def _dit(family: str, height: int = 64) -> list[str]:
    return [f"model={MODELS[family]}", f"height={height}", "width=64", "steps=2"]


def _cases(devices: int) -> dict[str, tuple[list[str], list[str]]]:
    """name → (reference overrides, the parallel run's extra overrides)."""
    if devices == 2:
        return {**{f"{family}_ring": (_dit(family), RING) for family in MODELS},
                "unet_ring": (["model=tiny_random", "height=64", "width=64", "steps=2"], RING),
                "alpha_ulysses_uneven_heads": ([*_dit("pixart"), *AS_ALPHA], ULYSSES)}
    if devices == 3:  # 80 px: bands of 4, 4, 2 latent rows
        return {**{f"{family}_ring_uneven": (_dit(family, 80), RING) for family in MODELS},
                "pixart_ulysses_uneven_heads": (_dit("pixart", 80), ULYSSES)}  # 4 heads / 3
    return {**{f"{family}_usp": (_dit(family), USP22) for family in MODELS},
            "flux_ring": (_dit("flux"), RING),
            "alpha_ulysses_idle_rank": ([*_dit("pixart"), *AS_ALPHA], ULYSSES),  # 3 heads / 4
            "pixart_ring_cfg": (_dit("pixart"), [*RING, *CFG]),
            "sd3_usp_cfg": (_dit("sd3"), ["+strategy=usp", "strategy.ring_degree=2", *CFG]),
            "flux_usp_data": ([*_dit("flux"), "prompt=[a red circle,a blue square]"],
                              ["+strategy=usp", "strategy.ring_degree=2",
                               "strategy.data_degree=2"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for devices in (2, 3, 4):
        tmp = tmp_path_factory.mktemp(f"ring{devices}")
        found.update({f"{devices}:{name}": result for name, result
                      in run_against_one_device(_cases(devices), devices, tmp).items()})
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{d}:{n}" for d in (2, 3, 4) for n in _cases(d)])
def test_equals_one_device(runs: dict[str, Any], name: str) -> None:
    check_exact(*runs[name])


@pytest.mark.slow
def test_the_runs_used_the_strategy_asked_for(runs: dict[str, Any]) -> None:
    """The strategy is really the one under test (its mode lands in the run record), and the
    ring's result is not sync_patch's bit for bit (its merge reorders the sums)."""
    run, ref = runs["4:pixart_usp"]
    assert "usp ulysses_degree=2, ring_degree=2" in run["strategy_mode"]
    assert run["strategy_mode"] != ref["strategy_mode"]
    assert float((latents(run) - latents(ref)).abs().max()) > 0


def test_partial_attentions_merge_to_the_whole() -> None:
    """Keys cut into uneven chunks, each attended with its log-sum-exp, merge to SDPA's result
    (the ring's algebra, without the ring)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    merged = _Merged()
    for chunk in ((0, 5), (5, 6), (6, 11)):
        part = slice(*chunk)
        merged.add(*attend_with_lse(q, k[:, :, part], v[:, :, part], scale=0.3))
    assert merged.out is not None
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert float((merged.out - want).abs().max()) < 1e-5
    out, lse = attend_with_lse(q, k, v, scale=0.3)
    assert float((lse - torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1)).abs().max()) < 1e-5


def test_head_shares_deal_larger_first() -> None:
    assert head_shares(4, 3) == [2, 1, 1] and head_shares(3, 4) == [1, 1, 1, 0]
    assert head_shares(8, 4) == [2, 2, 2, 2]


def test_usp_degrees() -> None:
    assert usp_degrees(4, 2, None) == (2, 2) and usp_degrees(4, None, 4) == (1, 4)
    assert usp_degrees(8, None, None, heads=4) == (4, 2)  # the most Ulysses the heads allow
    assert usp_degrees(6, None, None, heads=3) == (3, 2)


@pytest.mark.parametrize("overrides,message", [
    (["launcher.devices=4", "strategy.ulysses_degree=3", "strategy.ring_degree=2"],
     r"ulysses_degree=3: must divide the 4 ranks of one image; ulysses × ring pairs that fit: "
     r"1×4, 2×2, 4×1"),
    (["launcher.devices=4", "strategy.ulysses_degree=2", "strategy.ring_degree=1"],
     r"ulysses_degree=2 × strategy.ring_degree=1 = 2, but one image has 4 ranks"),
    (["launcher.devices=4", "strategy.cfg_split=true", "strategy.ring_degree=4"],
     r"ring_degree=4: must divide the 2 ranks of one image"),
    (["launcher.devices=3", "strategy.cfg_split=true"], r"guidance halves would differ"),
])
def test_usp_refusals_name_the_values(overrides: list[str], message: str,
                                      tmp_path: Path) -> None:
    cfg = compose(["model=tiny_pixart_random", "+strategy=usp", "height=128", *overrides])
    with pytest.raises(ParaflowError, match=message):
        validate(cfg, tmp_path, devices=False)


@pytest.mark.parametrize("name", ["ring", "usp"])
def test_configs_compose_and_build(name: str) -> None:
    strategy = build_strategy(compose([f"+strategy={name}", "launcher.devices=2"]).strategy)
    assert strategy.name == name and strategy.replicated_latents


def test_ulysses_takes_heads_that_do_not_divide(tmp_path: Path) -> None:
    """PixArt's 4 heads over 3 bands: dealt 2, 1, 1 instead of refused."""
    cfg = compose(["model=tiny_pixart_random", "+strategy=ulysses", "launcher.devices=3",
                   "height=96"])
    validate(cfg, tmp_path, devices=False)
