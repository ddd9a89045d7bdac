"""Compiled stages on 2 ranks (the session's kept gloo ranks), against the same strategy eager:

- latents within 1e-4 of eager and zero graph breaks, regional, for data, tensor, sync_patch,
  Ulysses and distrifusion on the tiny PixArt, and sync_patch (its banded decode compiled too)
  and distrifusion on the tiny UNet, whose patch layers (convolution halos, GroupNorm
  statistics) only a UNet has. Inductor (C++ kernels from the machine's compiler) compiles the
  PixArt's sync_patch; the others use dynamo's capture (`backend=eager`: the same graphs, run op
  for op), since inductor's cold compile is what costs here;
- the compiled exchanges count the same bytes per step; displaced patch compiles each region at
  most three ways (synchronous, the first displaced step, the later ones), not once per step;
- a diffusers dispatch backend through the band processors equals torch's default kernel.

Inductor on the UNet is not run here: its 7 regions take minutes to compile cold on 2 cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.patch_helpers import config, image, latents, run_many

pytestmark = pytest.mark.slow
D = "pipeline.stages.denoise."
V = "pipeline.stages.decode."
CAPTURE = [f"{D}compile_options.backend=eager"]  # dynamo's graphs, run op for op
UNET = ["model=tiny_random", "steps=5", "height=64", "width=64"]
DIT = ["model=tiny_pixart_random", "steps=4", "height=48", "width=80"]
UNET_REGIONS = 7  # the tiny UNet's 3 down blocks, mid block and 3 up blocks (compile_regions)
CASES = {  # name → (model and strategy on 2 ranks, compile overrides)
    "pixart_data": ([*DIT, "+strategy=data", "images_per_prompt=2"], CAPTURE),
    "pixart_tensor": ([*DIT, "+strategy=tensor"], CAPTURE),
    "pixart_sync_patch": ([*DIT, "+strategy=sync_patch"], []),  # inductor
    "pixart_ulysses": ([*DIT, "+strategy=ulysses"], CAPTURE),
    "pixart_distrifusion": ([*DIT, "+strategy=distrifusion"], CAPTURE),
    "unet_sync_patch": ([*UNET, "+strategy=sync_patch"],  # the banded decode compiled too
                        [*CAPTURE, f"{V}compile=regional", f"{V}compile_options.backend=eager"]),
    "unet_distrifusion": ([*UNET, "+strategy=distrifusion"], CAPTURE),
}
DISPATCH = [*DIT, "+strategy=sync_patch", "attention.backend=_native_math"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("compile")
    named: dict[str, list[str]] = {}
    for name, (base, options) in CASES.items():
        named[f"{name}-eager"] = [*base, "launcher.devices=2"]
        named[f"{name}-compiled"] = [*base, "launcher.devices=2", f"{D}compile=regional",
                                     *options]
    named["dispatch"] = [*DISPATCH, "launcher.devices=2"]
    cfgs = [config(overrides, tmp / name) for name, overrides in named.items()]
    return dict(zip(named, run_many(cfgs)))


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager_without_graph_breaks(case: str, runs: Any) -> None:
    eager, compiled = runs[f"{case}-eager"], runs[f"{case}-compiled"]
    assert torch.allclose(latents(compiled), latents(eager), atol=1e-4)
    for rank in range(2):
        report = compiled["compile"][rank]
        assert report["graph_breaks"] == {}, (rank, report["graph_breaks"])
        images = compiled["images_per_rank"][rank]
        assert report["graphs"] >= 1 or images == 0, (rank, report)
        assert eager["compile"][rank]["graphs"] == 0


def test_compiled_exchanges_count_the_same_bytes(runs: Any) -> None:
    """The compiled layers count their bytes in a tensor, booked at each step's end."""
    eager, compiled = runs["unet_sync_patch-eager"], runs["unet_sync_patch-compiled"]
    assert compiled["comm_bytes_per_step"] == eager["comm_bytes_per_step"]
    assert compiled["comm_bytes"] == eager["comm_bytes"]


def test_a_compiled_banded_decode_equals_eager(runs: Any) -> None:
    eager, compiled = runs["unet_sync_patch-eager"], runs["unet_sync_patch-compiled"]
    difference = (image(compiled) - image(eager)).abs().max()
    assert difference <= 1, difference  # uint8 rounding of the same operations


def test_displaced_patch_compiles_a_bounded_number_of_variants(runs: Any) -> None:
    compiled = runs["unet_distrifusion-compiled"]
    for report in compiled["compile"]:
        assert report["graphs"] <= 3 * UNET_REGIONS, report


def test_a_dispatch_backend_in_the_band_processors_equals_torch_s_kernel(runs: Any) -> None:
    assert torch.allclose(latents(runs["dispatch"]), latents(runs["pixart_sync_patch-eager"]),
                          atol=1e-5)
