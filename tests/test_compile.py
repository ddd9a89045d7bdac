"""Compilation as a stage policy (paraflow/compile.py) on one device: regional and full compile
with zero graph breaks (run.json's per-rank `compile`, from dynamo's counters: a test that fails
when a break appears), the same latents as eager (the `eager` backend runs the captured graphs
op for op: the same path, so equal to 1e-6; inductor's kernels are checked against eager on 2
ranks in test_compile_parallel.py), the VAE's decode compiled too, a step cache around compiled
blocks, and bad settings refused before launch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.validate import validate
from tests.conftest import one_device_run

STEPS = 4
D = "pipeline.stages.denoise."
EAGER = [f"{D}compile_options.backend=eager"]  # dynamo's capture without code generation


def run(tmp_path: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    return one_device_run(tmp_path, name, STEPS, overrides)


@pytest.mark.parametrize("model,size", [
    ("tiny_random", ["height=64", "width=64"]),
    pytest.param("tiny_flux_random", ["height=48", "width=80"], marks=pytest.mark.slow)])
def test_regional_and_full_compile_equal_eager_without_graph_breaks(
        tmp_path: Path, model: str, size: list[str]) -> None:
    base = [f"model={model}", *size]
    plain = run(tmp_path, "plain", base)
    assert plain["compile"]["graphs"] == 0
    for mode in ("regional", "full"):
        compiled = run(tmp_path, mode, [*base, f"{D}compile={mode}", *EAGER])
        report = compiled["compile"]
        assert report["graph_breaks"] == {}, report
        assert report["graphs"] >= 1 and report["ops_captured"] > 0
        assert torch.allclose(compiled["latents"], plain["latents"], atol=1e-6)


@pytest.mark.slow
def test_a_compiled_decode_and_a_cache_around_compiled_blocks(tmp_path: Path) -> None:
    """The VAE's blocks compiled (decode), and a first-block cache whose hooks wrap the
    compiled blocks: it decides and skips as it does eagerly, with no graph break."""
    base = ["model=tiny_flux_random", "height=48", "width=80", f"steps={8}",
            f"{D}cache=first_block", f"{D}cache_options.threshold=0.5"]
    plain = run(tmp_path, "plain", base)
    compiled = run(tmp_path, "compiled", [
        *base, f"{D}compile=regional", *EAGER, "pipeline.stages.decode.compile=regional",
        "pipeline.stages.decode.compile_options.backend=eager"])
    assert compiled["compile"]["graph_breaks"] == {}
    assert compiled["calls"] == plain["calls"] < 8  # the same reuse decisions
    assert torch.allclose(compiled["latents"], plain["latents"], atol=1e-6)
    difference = np.abs(compiled["image"].astype(int) - plain["image"].astype(int))
    assert difference.max() <= 1  # uint8 rounding


@pytest.mark.parametrize("overrides,needle", [
    (["pipeline.stages.encode.compile=regional"],
     "pipeline.stages.encode.compile=regional: EncodePrompt cannot compile"),
    ([f"{D}compile=regional", f"{D}compile_options.backend=tensorrt_x"],
     "compile_options.backend=tensorrt_x: one of"),
    ([f"{D}compile=full", f"{D}compile_options.mode=fastest"],
     "compile_options.mode=fastest: one of"),
    ([f"{D}compile=full", *EAGER, f"{D}compile_options.mode=default"],
     "a mode is inductor's; backend=eager takes none"),
    ([f"{D}compile=regional", f"{D}compile_options.mode=reduce-overhead",
      "launcher.accelerator=cpu"], "CUDA graphs need a CUDA device"),
    ([f"{D}compile=regional", "launcher.link.bandwidth_gb_s=10"],
     "launcher.link.bandwidth_gb_s=10.0: a modeled link sleeps on the host"),
])
def test_bad_compile_settings_are_refused_before_launch(overrides: list[str],
                                                        needle: str) -> None:
    with pytest.raises(ParaflowError) as error:
        validate(compose(["model=tiny_random", *overrides]), None)
    assert needle in str(error.value)


def test_an_unknown_compile_mode_is_refused_by_the_schema() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose([f"{D}compile=partial"])
    assert "none, regional, full" in str(error.value.__cause__ or error.value)
