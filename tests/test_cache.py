"""Step caches (paraflow/cache) on one device, every family: with nothing to reuse (threshold 0,
interval 1) the hooks are transparent, bit for bit (the same path); reusing, the denoiser-call
count drops as run.json records and the image stays within a stated PSNR of the uncached one.
Bad kinds and options are refused before launch. On 2 ranks: test_cache_parallel.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import ConfigCompositionException

from paraflow.api import compose, generate
from paraflow.errors import ParaflowError
from paraflow.metrics import psnr
from paraflow.validate import validate
from tests.conftest import read_images, read_latents

STEPS = 10
C = "pipeline.stages.denoise."
FAMILIES = {"tiny_random": ["height=64", "width=64"],
            "tiny_pixart_random": ["height=48", "width=80"],
            "tiny_sd3_random": ["height=48", "width=80"],
            "tiny_flux_random": ["height=48", "width=80"]}


def run(tmp_path: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    out = tmp_path / name
    generate(compose([f"steps={STEPS}", "save_latents=true", "pipeline.progress=false",
                      "launcher.threads_per_rank=1", *overrides]), out)
    record = json.loads((out / "run.json").read_text())
    return {"latents": read_latents(out), "image": read_images(out)[0],
            "calls": record["denoiser_calls"][0], "reused": record["reused_steps"][0]}


def cache(kind: str, **options: float) -> list[str]:
    return [f"{C}cache={kind}", *(f"{C}cache_options.{k}={v}" for k, v in options.items())]


@pytest.mark.parametrize("model", list(FAMILIES))
def test_first_block_cache_is_transparent_at_threshold_0_and_reuses_above(
        model: str, tmp_path: Path) -> None:
    base = [f"model={model}", *FAMILIES[model]]
    plain = run(tmp_path, "plain", base)
    assert plain["calls"] == STEPS and plain["reused"] == []
    never = run(tmp_path, "never", [*base, *cache("first_block", threshold=0)])
    assert torch.equal(never["latents"], plain["latents"]) and never["calls"] == STEPS
    reusing = run(tmp_path, "reusing", [*base, *cache("first_block", threshold=0.5)])
    assert reusing["calls"] + len(reusing["reused"]) == STEPS
    assert 1 <= reusing["calls"] < STEPS  # the first step always runs whole
    assert psnr(reusing["image"], plain["image"], 255.0) > 20, model


def test_deepcache_runs_every_interval_th_step_whole(tmp_path: Path) -> None:
    base = ["model=tiny_random"]
    plain = run(tmp_path, "plain", base)
    every = run(tmp_path, "every", [*base, *cache("deepcache", interval=1)])
    assert torch.equal(every["latents"], plain["latents"]) and every["calls"] == STEPS
    third = run(tmp_path, "third", [*base, *cache("deepcache", interval=3)])
    assert third["reused"] == [i for i in range(STEPS) if i % 3]  # steps 0, 3, 6, 9 run whole
    assert psnr(third["image"], plain["image"], 255.0) > 15


@pytest.mark.parametrize("overrides,needle", [
    ([*cache("first_block", interval=2)], "cache_options.interval: cache=first_block takes "
                                          "threshold"),
    ([f"{C}cache_options.threshold=0.1"], "cache_options.threshold: cache=none takes no options"),
    ([*cache("first_block", threshold=-1)], "cache_options.threshold=-1.0: must be >= 0"),
    ([*cache("deepcache", interval=0)], "cache_options.interval=0: must be at least 1"),
    (["pipeline.stages.decode.cache=first_block"], "pipeline.stages.decode.cache=first_block: "
                                                   "Decode cannot cache"),
    (["model=tiny_pixart_random", *cache("deepcache")], "cache=deepcache: a pixart model "
                                                        "takes first_block"),
])
def test_bad_caches_are_refused_before_launch(overrides: list[str], needle: str) -> None:
    with pytest.raises(ParaflowError) as error:
        validate(compose(sorted(overrides, key=lambda o: not o.startswith("model="))), None)
    assert needle in str(error.value)


def test_an_unknown_kind_or_option_is_refused_by_the_schema() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose([f"{C}cache=teacache"])
    assert "none, first_block, deepcache" in str(error.value.__cause__ or error.value)
    with pytest.raises(ConfigCompositionException) as error:
        compose([f"{C}cache_options.ratio=2"])
    assert "ratio" in str(error.value.__cause__ or error.value)


def test_a_finished_generation_leaves_the_hooks_transparent(tmp_path: Path) -> None:
    """After a cached generation the hooks stay installed but pass through: the denoiser gives
    what it gives without them."""
    from paraflow.cache.hooks import installed, remove
    from paraflow.context import ParallelContext
    from paraflow.session import Session

    cfg = compose(["model=tiny_random", f"steps={STEPS}", *cache("first_block", threshold=0.5)])
    session = Session(ParallelContext.single(torch.device("cpu")), cfg)
    done = session.generate(cfg, [str(cfg.prompt)])
    assert done.env.denoiser_calls.reused  # it did reuse
    unet = session.pipe.unet
    hooked = [m for m in unet.modules() if installed(m)]
    assert len(hooked) == 1 + len(unet.down_blocks) - 1 + 1 + len(unet.up_blocks)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 16, unet.config.cross_attention_dim, generator=generator)
    with torch.inference_mode():
        through = unet(sample, 500, encoder_hidden_states=text).sample
        for module in hooked:
            remove(module)
        assert not any(installed(m) for m in unet.modules())
        bare = unet(sample, 500, encoder_hidden_states=text).sample
    assert torch.equal(through, bare)
