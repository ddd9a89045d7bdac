"""Patch strategy configs, pre-launch checks, NaN detection and the link model (no processes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from paraflow.api import compose
from paraflow.comm import LinkModel
from paraflow.errors import ParaflowError
from paraflow.launcher import link_model
from paraflow.registry import build_strategy
from paraflow.validate import validate
from tests.patch_helpers import config, run_single

NAMES = ["naive_patch", "sync_patch", "displaced_patch", "distrifusion"]


@pytest.mark.parametrize("name", NAMES)
def test_every_patch_config_composes_and_builds(name: str) -> None:
    cfg = compose([f"+strategy={name}", "launcher.devices=2"])
    strategy = build_strategy(cfg.strategy)
    assert strategy.name == name and strategy.replicated_latents


def test_distrifusion_preset_is_the_papers() -> None:
    strategy = build_strategy(compose(["+strategy=distrifusion"]).strategy)
    assert strategy.warmup_steps == 4 and strategy.groupnorm.value == "corrected_async"


@pytest.mark.parametrize("override", ["strategy.cfg_splt=true", "strategy.groupnorm=fast",
                                      "strategy.warmup_steps=many"])
def test_misspelt_keys_and_values_fail_at_compose(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose(["+strategy=displaced_patch", override])


@pytest.mark.parametrize("overrides,message", [
    (["height=64", "launcher.devices=3"], r"valid heights .*96"),
    (["height=72"], "multiple of the model's downsampling"),
    (["strategy.cfg_split=true", "guidance_scale=1.0"], "turns guidance off"),
])
def test_bad_layouts_fail_before_launch(overrides: list[str], message: str,
                                        tmp_path: Path) -> None:
    cfg = compose(["model=tiny_random", "+strategy=sync_patch", "launcher.devices=2", *overrides])
    with pytest.raises(ParaflowError, match=message):
        validate(cfg, tmp_path)


def test_patch_decode_needs_a_patch_strategy(tmp_path: Path) -> None:
    cfg = compose(["+strategy=data", "launcher.devices=2", "pipeline.stages.decode.parallel=patch"])
    with pytest.raises(ParaflowError, match="patch strategy"):
        validate(cfg, tmp_path)


def test_nan_latents_fail_naming_step_and_mode(tmp_path: Path) -> None:
    cfg = config(["+strategy=displaced_patch", "steps=2", "guidance_scale=1e38"], tmp_path / "o")
    with pytest.raises(ParaflowError, match=r"step \d of 2 \(strategy displaced_patch groupnorm"):
        run_single(cfg)
    assert not (tmp_path / "o" / "run.json").exists()


def test_link_model_serialises_transfers() -> None:
    assert link_model(compose([])) is None
    link = link_model(compose(["launcher.link.bandwidth_gb_s=1", "launcher.link.latency_us=1000"]))
    assert isinstance(link, LinkModel) and "modeled" in link.label()
    start = time.perf_counter()
    first = link.reserve(1e6)  # 1 ms of bandwidth + 1 ms latency
    second = link.reserve(1e6)  # queued behind the first
    assert first - start == pytest.approx(2e-3, abs=5e-4)
    assert second - first == pytest.approx(2e-3, abs=1e-4)
    LinkModel.wait_until(second)
    assert time.perf_counter() >= second


@pytest.mark.slow
def test_cli_distrifusion_on_two_ranks_with_the_default_model(tmp_path: Path) -> None:
    """What the README tells a user to type (smaller): exit 0, one image, labelled run.json,
    the decode in bands (the default for patch strategies) counted outside the steps."""
    from .conftest import read_images, run_cli

    out = tmp_path / "run"
    result = run_cli(["+strategy=distrifusion", "launcher.devices=2", "height=128", "width=128",
                      "steps=6", "pipeline.progress=false", "launcher.threads_per_rank=1",
                      f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(distrifusion, 2 rank(s))" in result.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["strategy_mode"].startswith("distrifusion groupnorm=corrected_async")
    assert all(b > 0 for b in record["comm_bytes_outside_steps"])  # the band decode's exchange
    (image,) = read_images(out)
    assert image.shape == (128, 128, 3) and image.std() > 5  # not a blank image
