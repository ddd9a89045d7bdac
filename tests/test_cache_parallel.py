"""Step caches on 2 ranks (the session's kept gloo ranks), for every kind of strategy:

- threshold 0 (nothing reused): each strategy equals its own uncached run within 1e-5;
- reusing: every rank of an image (bands, and guidance halves with cfg_split) records the same
  reused steps, one device's (the decision is one all-reduce of two float64 sums per step over
  the ranks sharing the image, which the communicator counts: 16 bytes per rank and step);
  `data` replicas decide alone; the image stays within a stated PSNR of one device without
  cache;
- taylorseer (PixArt and Flux, sync_patch and ulysses): the step number decides, with no
  collective, and each rank forecasts its own band: one device's taylorseer run, within what
  patch parallelism is held to without a cache (check_exact: latents within 1e-4, pixels 1 grey
  level).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.patch_helpers import (
    check_exact,
    config,
    image,
    latents,
    psnr,
    run_many,
    run_single,
)

pytestmark = pytest.mark.slow
STEPS = 10
C = "pipeline.stages.denoise."
UNET = ["model=tiny_random", f"steps={STEPS}", "height=64", "width=64"]
DIT = ["model=tiny_pixart_random", f"steps={STEPS}", "height=48", "width=80"]
STRATEGIES = {  # name → (model, strategy overrides on 2 ranks)
    "sync_patch": (UNET, ["+strategy=sync_patch"]),
    "sync_patch_cfg_split": (UNET, ["+strategy=sync_patch", "strategy.cfg_split=true"]),
    "ulysses": (UNET, ["+strategy=ulysses"]),
    "distrifusion": (UNET, ["+strategy=distrifusion"]),
    "tensor": (UNET, ["+strategy=tensor"]),
    "data": (UNET, ["+strategy=data", "images_per_prompt=2"]),
    "pixart_sync_patch": (DIT, ["+strategy=sync_patch"]),
    "pixart_ulysses": (DIT, ["+strategy=ulysses"]),
}
FIRST_BLOCK = [f"{C}cache=first_block"]
VARIANTS = {"plain": [], "never": [*FIRST_BLOCK, f"{C}cache_options.threshold=0"],
            "tiny": [*FIRST_BLOCK, f"{C}cache_options.threshold=1e-12"],
            "reusing": [*FIRST_BLOCK, f"{C}cache_options.threshold=0.5"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("cache")
    keys = [(s, v) for s in STRATEGIES for v in VARIANTS]
    cfgs = [config([*STRATEGIES[s][0], "launcher.devices=2", *STRATEGIES[s][1], *VARIANTS[v]],
                   tmp / f"{s}-{v}") for s, v in keys]
    return dict(zip(keys, run_many(cfgs)))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("one")
    return {name: run_single(config(model, tmp / name))
            for name, model in (("unet", UNET), ("pixart", DIT))}


FLUX = ["model=tiny_flux_random", f"steps={STEPS}", "height=48", "width=80"]
TAYLOR = {"pixart_sync_patch": (DIT, ["+strategy=sync_patch"]),
          "pixart_ulysses": (DIT, ["+strategy=ulysses"]),
          "flux_sync_patch": (FLUX, ["+strategy=sync_patch"]),
          "flux_ulysses": (FLUX, ["+strategy=ulysses"])}
TAYLORSEER = [f"{C}cache=taylorseer", f"{C}cache_options.interval=3"]


@pytest.fixture(scope="module")
def taylorseer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each TAYLOR case on 2 ranks with and without the cache, and each model's taylorseer run
    on one device (`one_device` below)."""
    tmp = tmp_path_factory.mktemp("taylorseer")
    keys = [(s, v) for s in TAYLOR for v in ("plain", "taylorseer")]
    cfgs = [config([*TAYLOR[s][0], "launcher.devices=2", *TAYLOR[s][1],
                    *(TAYLORSEER if v == "taylorseer" else [])], tmp / f"{s}-{v}")
            for s, v in keys]
    done: dict[Any, Any] = dict(zip(keys, run_many(cfgs)))
    for name, model in (("pixart", DIT), ("flux", FLUX)):
        done[name] = run_single(config([*model, *TAYLORSEER], tmp / f"one-{name}"))
    return done


@pytest.mark.parametrize("case", list(TAYLOR))
def test_taylorseer_on_2_ranks_is_one_devices_taylorseer(case: str, taylorseer: Any) -> None:
    """Steps 0, 1, 4, 7 run whole on both ranks, the others forecast; a full step sends what
    the uncached run sends (no decision to exchange), a forecast step less (only the first
    block's exchanges)."""
    run, plain = taylorseer[case, "taylorseer"], taylorseer[case, "plain"]
    reused = [2, 3, 5, 6, 8, 9]
    assert run["reused_steps"] == [reused, reused] and run["denoiser_calls"] == [4, 4]
    for rank in range(2):
        sent, uncached = run["comm_bytes_per_step"][rank], plain["comm_bytes_per_step"][rank]
        for step in range(STEPS):
            if step in reused:
                assert sent[str(step)] < uncached[str(step)], (rank, step)
            else:
                assert sent[str(step)] == uncached[str(step)], (rank, step)
    one = taylorseer[case.split("_")[0]]
    assert one["reused_steps"] == [reused]
    check_exact(run, one)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_threshold_0_equals_the_uncached_run(strategy: str, runs: Any) -> None:
    plain, never = runs[strategy, "plain"], runs[strategy, "never"]
    assert torch.allclose(latents(never), latents(plain), atol=1e-5)
    assert never["denoiser_calls"] == [STEPS, STEPS] and never["reused_steps"] == [[], []]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "data"])
def test_the_ranks_of_an_image_decide_together(strategy: str, runs: Any, one_device: Any
                                               ) -> None:
    reusing = runs[strategy, "reusing"]
    reused = reusing["reused_steps"]
    assert reused[0] == reused[1] and reused[0], reused  # the same steps, and some
    assert reusing["denoiser_calls"][0] == STEPS - len(reused[0])
    reference = one_device["pixart" if strategy.startswith("pixart") else "unet"]
    assert psnr(image(reusing), image(reference), 255.0) > 20


@pytest.mark.parametrize("strategy", ["sync_patch", "ulysses", "tensor", "pixart_sync_patch"])
def test_the_decision_is_one_counted_all_reduce_per_step(strategy: str, runs: Any) -> None:
    """threshold 1e-12 decides every step but reuses none: its bytes are the uncached run's
    plus 16 per rank on every step after the first (which has nothing to compare with)."""
    plain, tiny = runs[strategy, "plain"], runs[strategy, "tiny"]
    assert tiny["reused_steps"] == [[], []]
    for rank in range(2):
        steps_plain = plain["comm_bytes_per_step"][rank]
        steps_tiny = tiny["comm_bytes_per_step"][rank]
        added = {step: steps_tiny[step] - steps_plain[step] for step in steps_plain}
        assert added == {str(i): (16 if i else 0) for i in range(STEPS)}, added


def test_data_replicas_decide_alone(runs: Any) -> None:
    reusing = runs["data", "reusing"]
    assert reusing["denoiser_calls"][0] + len(reusing["reused_steps"][0]) == STEPS
    assert reusing["denoiser_calls"][1] + len(reusing["reused_steps"][1]) == STEPS
    assert reusing["comm_bytes_per_step"] == runs["data", "plain"]["comm_bytes_per_step"]


@pytest.fixture(scope="module")
def one_device_reusing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_single(config([*UNET, *VARIANTS["reusing"]],
                             tmp_path_factory.mktemp("one-reusing") / "unet"))


@pytest.mark.parametrize("strategy", ["sync_patch", "sync_patch_cfg_split"])
def test_bands_and_guidance_halves_decide_as_one_device_would(
        strategy: str, runs: Any, one_device_reusing: Any) -> None:
    """The bands (and, with the guidance split, the two halves of the batch on different ranks)
    add their sums into the whole image's: the steps reused are one device's."""
    assert runs[strategy, "reusing"]["reused_steps"] == one_device_reusing["reused_steps"] * 2
