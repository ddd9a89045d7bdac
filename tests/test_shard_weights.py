"""strategy.shard_weights=true (strategies/patch/shard.py): FSDP2 over the ranks of one image.
Every patch strategy with sharded weights gives its unsharded run's final latents within 1e-5;
the denoiser's and the text encoders' parameter bytes per rank fall by about the group size; the
extra bytes the all-gathers move are counted, and the planner gives the same weights and bytes.
The refusals (a stage that places a sharded module elsewhere, or offloads it on GPUs) come before
any rank starts; on CPU ranks, where offload moves nothing, the default encode offload runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.plan import make_plan
from paraflow.validate import validate
from tests.patch_helpers import config, latents, run_many

SHARD = ["strategy.shard_weights=true"]
# the defaults (encode offload=cpu) on CPU ranks, where offload moves nothing
PIXART = ["model=tiny_pixart_random", "height=64", "width=64", "steps=2"]
SD3 = ["model=tiny_sd3_random", "height=64", "width=64", "steps=2"]
UNET = ["model=tiny_random", "height=64", "width=64", "steps=2"]
GPU = ["launcher.accelerator=cuda"]  # checked as the planner checks a GPU run (devices=False)
GPU_KEEP = [*GPU, "pipeline.stages.encode.offload=none"]
SYNC = ["+strategy=sync_patch"]
CASES: dict[str, tuple[list[str], int]] = {  # name → (overrides, ranks)
    "pixart_sync": ([*PIXART, *SYNC], 2),
    "pixart_distrifusion_warm": ([*PIXART, "+strategy=distrifusion",
                                  "strategy.warmup_steps=2"], 2),
    "pixart_ulysses": ([*PIXART, "+strategy=ulysses"], 2),
    "pixart_naive": ([*PIXART, "+strategy=naive_patch"], 2),
    "pixart_ring": ([*PIXART, "+strategy=ring"], 2),
    "sd3_sync": ([*SD3, *SYNC], 2),
    "unet_sync": ([*UNET, *SYNC], 2),
    "pixart_sync_cfg": ([*PIXART, *SYNC, "strategy.cfg_split=true"], 4),  # bands of 2 per half
    "flux_usp": (["model=tiny_flux_random", "height=64", "width=64", "steps=2", "+strategy=usp",
                  "strategy.ulysses_degree=2", "strategy.ring_degree=2"], 4),  # shards of 4
}
SHARDED = ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, tuple[dict[str, Any], dict[str, Any], Any]]:
    """name → (sharded record, unsharded record, the sharded config), one launch per rank
    count."""
    tmp: Path = tmp_path_factory.mktemp("shard")
    cfgs = []
    for name, (overrides, ranks) in CASES.items():
        ranked = [*overrides, f"launcher.devices={ranks}"]
        cfgs += [config([*ranked, *SHARD], tmp / name), config(ranked, tmp / f"{name}_whole")]
    records = run_many(cfgs)
    return {name: (records[2 * i], records[2 * i + 1], cfgs[2 * i])
            for i, name in enumerate(CASES)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(runs: dict[str, Any], name: str) -> None:
    sharded, whole, _ = runs[name]
    diff = float((latents(sharded) - latents(whole)).abs().max())
    print(f"{name}: max |sharded - unsharded| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_parameter_bytes_fall_by_the_group(runs: dict[str, Any], name: str) -> None:
    """Per rank, each sharded module holds its chunk: 1/N of it (N bands), at most a row of
    padding more per parameter; the VAE stays whole. The all-gathers add bytes at every step."""
    sharded, whole, _ = runs[name]
    # the bands of one image: 2 (4 ranks with the guidance split: 2 per half), 4 under usp 2×2
    group = 4 if name == "flux_usp" else 2
    for module, per_rank in sharded["param_bytes"].items():
        full = whole["param_bytes"][module][0]
        print(f"{name} {module}: {per_rank} bytes per rank sharded, {full} whole")
        if module in SHARDED:
            assert sum(per_rank[:group]) == full  # the chunks of one group add up
            assert max(per_rank) <= (1.1 / group) * full
        else:
            assert per_rank == whole["param_bytes"][module]
    for rank, steps in enumerate(sharded["comm_bytes_per_step"]):
        assert all(steps[s] > whole["comm_bytes_per_step"][rank].get(s, 0) for s in steps)
    assert min(sharded["comm_bytes_outside_steps"]) > max(whole["comm_bytes_outside_steps"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pixart_sync", "pixart_distrifusion_warm", "sd3_sync",
                                  "unet_sync"])
def test_planned_weights_and_bytes_equal_the_run(runs: dict[str, Any], name: str) -> None:
    sharded, _, cfg = runs[name]
    plan = make_plan(cfg)
    for rank, row in enumerate(plan.ranks):
        assert row.weights == {k: v[rank] for k, v in sharded["param_bytes"].items()}, rank
        steps = {str(s): b for s, b in enumerate(row.comm_per_step) if b}
        assert steps == sharded["comm_bytes_per_step"][rank]
        outside = row.comm_encode + row.comm_decode + row.comm_gather
        assert row.comm_encode > 0 and outside == sharded["comm_bytes_outside_steps"][rank]
        assert row.comm_run == sharded["comm_bytes"][rank]
    assert any("shard_weights" in note for note in plan.notes)


@pytest.mark.parametrize("stage,key,value,target", [("encode", "offload", "cpu", GPU),
                                                    ("denoise", "placement", "cpu", []),
                                                    ("denoise", "offload", "cpu", GPU_KEEP)])
def test_moving_a_sharded_module_is_refused(stage: str, key: str, value: str,
                                            target: list[str]) -> None:
    cfg = compose([*PIXART, *SYNC, *SHARD, "launcher.devices=2", *target,
                   f"pipeline.stages.{stage}.{key}={value}"])
    with pytest.raises(ParaflowError, match=rf"pipeline.stages.{stage}.{key}={value} with "
                                            r"strategy.shard_weights=true.*allowed"):
        validate(cfg, None, devices=False)


def test_the_default_encode_offload_is_named_on_gpus() -> None:
    """The defaults offload the text encoders after the encode stage: on GPUs the error says
    what to add; on CPU ranks the defaults run (the multi-rank cases above use them)."""
    cfg = compose(["model=tiny_pixart_random", *SYNC, *SHARD, "launcher.devices=2", *GPU])
    with pytest.raises(ParaflowError, match="add pipeline.stages.encode.offload=none"):
        validate(cfg, None, devices=False)
    validate(compose(["model=tiny_pixart_random", *SYNC, *SHARD, "launcher.devices=2"]), None)


def test_sharding_validates_with_the_weights_kept() -> None:
    validate(compose([*PIXART, *SYNC, *SHARD, "launcher.devices=2"]), None)
