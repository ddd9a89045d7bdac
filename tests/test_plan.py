"""The planner (paraflow/plan) against measurement: bytes per step, bytes outside the steps,
weights and full denoiser calls equal what two gloo ranks counted (one launch of every run,
step-cached ones among them); SDXL at 3840² on 8 ranks plans in seconds without memory; a step
cache's reused steps cut the planned calls, bytes and FLOPs; the CLI prints the plan and refuses
what a run refuses."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import pytest

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.plan import Plan, make_plan
from tests.conftest import run_cli, run_paraflow
from tests.patch_helpers import config, run_many, run_single

BASE = ["width=64", "steps=3", "launcher.devices=2"]
SD, PIXART = "model=tiny_random", "model=tiny_pixart_random"
SD3, FLUX = "model=tiny_sd3_random", "model=tiny_flux_random"
DENOISE = "pipeline.stages.denoise"
RUNS = {
    "sync_patch": [SD, "+strategy=sync_patch", "height=64"],
    # steps 0-1 synchronous, step 2 displaced without GroupNorm traffic (fewer bytes)
    "displaced": [SD, "+strategy=displaced_patch", "height=64", "strategy.warmup_steps=1",
                  "strategy.groupnorm=separate"],
    "tensor": [SD, "+strategy=tensor", "height=64"],
    "uneven_bands": [SD, "+strategy=sync_patch", "height=96"],  # bands of 8 and 4 latent rows
    "data": [SD, "+strategy=data", "height=64", "prompt=[a,b,c]"],  # the images gathered after
    "pixart_sync_patch": [PIXART, "+strategy=sync_patch", "height=64"],
    "pixart_ulysses": [PIXART, "+strategy=ulysses", "height=80"],  # uneven: 6 and 4 rows
    "pixart_displaced": [PIXART, "+strategy=displaced_patch", "height=80",
                         "strategy.warmup_steps=1"],
    "sd3_sync_patch": [SD3, "+strategy=sync_patch", "height=64"],
    "sd3_tensor": [SD3, "+strategy=tensor", "height=64"],
    "flux_ulysses": [FLUX, "+strategy=ulysses", "height=80"],  # 3 and 2 rows of tokens
    "flux_tensor": [FLUX, "+strategy=tensor", "height=64"],
    "flux_displaced": [FLUX, "+strategy=displaced_patch", "height=80",
                       "strategy.warmup_steps=1"],
    "sd_ring": [SD, "+strategy=ring", "height=96"],  # hops of 8- and 4-row bands' keys/values
    "pixart_usp": [PIXART, "+strategy=usp", "strategy.ring_degree=2", "height=80"],
    "flux_ring": [FLUX, "+strategy=ring", "height=80"],  # the text attended once, not sent
    # the stages' hand-overs point to point, the prediction broadcast; step 0 whole-image
    "flux_pipefusion": [FLUX, "+strategy=pipefusion", "height=64"],
    # step 1 reuses (deepcache's schedule, exact): only the outer blocks exchange
    "sync_patch_deepcache": [SD, "+strategy=sync_patch", "height=64", f"{DENOISE}.cache=deepcache",
                             f"{DENOISE}.cache_options.interval=2"],
    # decides every step after the first (the decision's all-reduce), reuses none
    "sync_patch_first_block": [SD, "+strategy=sync_patch", "height=64",
                               f"{DENOISE}.cache=first_block",
                               f"{DENOISE}.cache_options.threshold=1e-9"],
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Plan, dict[str, Any]]]:
    tmp: Path = tmp_path_factory.mktemp("plan")
    cfgs = {name: config([*BASE, *overrides], tmp / name) for name, overrides in RUNS.items()}
    records = run_many(list(cfgs.values()))
    return {name: (make_plan(cfg), rec) for (name, cfg), rec in zip(cfgs.items(), records)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_planned_bytes_equal_the_counted_bytes(
        measured: dict[str, tuple[Plan, dict[str, Any]]], name: str) -> None:
    plan, record = measured[name]
    for rank, row in enumerate(plan.ranks):
        steps = {str(s): b for s, b in enumerate(row.comm_per_step) if b}
        assert steps == record["comm_bytes_per_step"][rank], (name, rank)
        assert row.comm_decode + row.comm_gather == record["comm_bytes_outside_steps"][rank]
        assert row.comm_run == record["comm_bytes"][rank]
        assert row.denoiser_calls == record["denoiser_calls"][rank], (name, rank)
        assert plan.summary["cache"].get("reused_steps", []) == record["reused_steps"][rank]
    if name in ("displaced", "pixart_displaced", "flux_displaced"):
        per_step = plan.ranks[0].comm_per_step
        if name == "displaced":  # no GroupNorm sums once displaced
            assert per_step[0] == per_step[1] > per_step[2]
        else:  # a transformer has no GroupNorm: the same pieces travel, later
            assert per_step[0] == per_step[1] == per_step[2]
    if name == "sync_patch_deepcache":  # the reused step sends less than the full ones
        per_step = plan.ranks[0].comm_per_step
        assert per_step[0] == per_step[2] > per_step[1] > 0
    # stale pieces, a cache's features, or PipeFusion's keys/values between steps; nothing for
    # the others
    carries = ("displaced" in name or "pipefusion" in name  # the other patches' keys/values
               or plan.summary["cache"]["kind"] != "none")
    assert all((row.carried_bytes > 0) == carries for row in plan.ranks), name


@pytest.mark.slow
def test_planned_weights_equal_param_bytes(measured: dict[str, tuple[Plan, dict[str, Any]]],
                                           tmp_path: Path) -> None:
    plan, record = measured["tensor"]
    for rank, row in enumerate(plan.ranks):
        assert row.weights == {k: v[rank] for k, v in record["param_bytes"].items()}
    single_cfg = config(["model=tiny_random", "steps=1"], tmp_path / "single")
    single = run_single(single_cfg)
    assert make_plan(single_cfg).ranks[0].weights == {
        k: v[0] for k, v in single["param_bytes"].items()}
    assert 0.5 < plan.ranks[0].weights["unet"] / single["param_bytes"]["unet"][0] <= 0.6


TWO_BANDS = [SD, "+strategy=sync_patch", "launcher.devices=2", "width=64", "height=64"]


def test_deepcache_halves_the_full_calls_and_cuts_the_bytes() -> None:
    plain = make_plan(compose([*TWO_BANDS, "steps=4"]))
    cached = make_plan(compose([*TWO_BANDS, "steps=4", f"{DENOISE}.cache=deepcache",
                                f"{DENOISE}.cache_options.interval=2"]))
    cache = cached.summary["cache"]
    assert (cache["kind"], cache["full_calls"], cache["steps"]) == ("deepcache", 2, 4)
    assert cache["reused_steps"] == [1, 3] and cache["hit_rate"] == round(2 / 3, 4)
    assert plain.summary["cache"] == {"kind": "none"}
    for without, row in zip(plain.ranks, cached.ranks):
        assert (without.denoiser_calls, row.denoiser_calls) == (4, 2)
        full, reused = row.comm_per_step[0::2], row.comm_per_step[1::2]
        assert full == without.comm_per_step[0::2]  # a full step exchanges as without a cache
        # reused: only conv_in, the first down block and the last up block run and exchange
        assert reused[0] == reused[1] and 0 < reused[0] < 0.6 * full[0]
        assert sum(row.comm_per_step) == 2 * full[0] + 2 * reused[0] \
            < 0.8 * sum(without.comm_per_step)
        assert row.comm_decode == without.comm_decode
        assert row.flops_per_step[0::2] == without.flops_per_step[0::2]
        assert 0 < row.flops_per_step[1] < 0.6 * row.flops_per_step[0]
        assert row.flops_run < without.flops_run
        assert row.carried_bytes > without.carried_bytes == 0  # the deep features, held
    table = cached.markdown()
    assert "kind deepcache, interval 2" in table and "full_calls 2, steps 4" in table
    assert "2 full denoiser call(s) for 4 steps" in table
    assert json.loads(json.dumps(cached.to_dict()))["ranks"][0]["denoiser_calls"] == 2


def test_first_block_follows_the_planned_hit_rate() -> None:
    base = [PIXART, "+strategy=sync_patch", "launcher.devices=2", "width=64", "height=64",
            "steps=5", f"{DENOISE}.cache=first_block"]
    never = make_plan(compose([*base, "plan_cache_hit_rate=0"]))
    half = make_plan(compose([*base, "plan_cache_hit_rate=0.5"]))
    assert never.summary["cache"]["reused_steps"] == [] and never.ranks[0].denoiser_calls == 5
    assert half.summary["cache"]["reused_steps"] == [1, 3]  # spread evenly
    assert half.summary["cache"]["hit_rate"] == 0.5 and half.ranks[0].denoiser_calls == 3
    decision = 16  # 2 float64 sums all-reduced over 2 ranks: 2·16·(2−1)/2 bytes
    sent, computed = never.ranks[0].comm_per_step, never.ranks[0].flops_per_step
    assert sent[1:] == [sent[0] + decision] * 4 and computed == [computed[0]] * 5
    sent_half, computed_half = half.ranks[0].comm_per_step, half.ranks[0].flops_per_step
    assert sent_half[0::2] == sent[0::2]  # full steps as at rate 0
    # reused: the first block runs and exchanges; the rest of the transformer nothing
    assert sent_half[1] == sent_half[3] and decision < sent_half[1] < sent[1]
    assert computed_half[1] == computed_half[3] < computed[1]
    assert half.ranks[0].comm_run < never.ranks[0].comm_run
    assert make_plan(compose(base)).ranks[0].comm_per_step == sent  # unset: as rate 0


@pytest.mark.parametrize("rate", ["-0.1", "1.0", "1.5"])
def test_a_hit_rate_outside_0_1_is_refused(rate: str) -> None:
    with pytest.raises(ParaflowError, match=f"plan_cache_hit_rate={rate}: .*in \\[0, 1\\)"):
        make_plan(compose([*TWO_BANDS, f"{DENOISE}.cache=first_block",
                           f"plan_cache_hit_rate={rate}"]))


def test_a_hit_rate_is_refused_where_the_cache_has_a_schedule_or_none() -> None:
    with pytest.raises(ParaflowError, match="plan_cache_hit_rate=0.5: .*deepcache reuses on a "
                                            "schedule"):
        make_plan(compose([*TWO_BANDS, f"{DENOISE}.cache=deepcache",
                           "plan_cache_hit_rate=0.5"]))
    with pytest.raises(ParaflowError, match="plan_cache_hit_rate=0.5: the run has no step cache"):
        make_plan(compose([*TWO_BANDS, "plan_cache_hit_rate=0.5"]))


def test_sdxl_at_3840_on_8_devices_plans_without_memory() -> None:
    fp16 = [f"pipeline.stages.{s}.precision=fp16" for s in ("encode", "denoise", "decode")]
    start = time.perf_counter()
    plan = make_plan(compose(["model=sdxl_arch", "+strategy=distrifusion", "height=3840",
                              "width=3840", "launcher.devices=8", "launcher.accelerator=cuda",
                              "plan_memory_gb=16", *fp16]))
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(plan.markdown(), f"planned in {seconds:.1f}s, process peak {peak_rss / 1e9:.2f} GB")
    assert peak_rss < 2e9  # no weights, no activations: meta tensors (time is printed only)
    assert len(plan.ranks) == 8 and len({r.device_peak for r in plan.ranks}) == 1
    row = plan.ranks[0]
    assert row.weights["unet"] == 2 * 2_567_463_684  # SDXL-base's UNet, fp16
    assert row.weights["text_encoder_2"] == 2 * 694_659_840
    # displaced: the stale pieces of every exchanged layer (and this step's in flight) are held
    # between steps; more than one synchronous step sends to the 7 others, less than the peak
    assert row.comm_per_step[0] < row.carried_bytes < row.activations["denoise"] < 80e9
    assert plan.summary["replayed_ranks"] == 1  # 8 bands of 60 latent rows: one kind of rank
    assert plan.fits is False and "does NOT fit" in plan.markdown()  # 16 GB is too little
    assert row.device_peak < 80e9


@pytest.mark.slow
def test_cli_prints_the_plan_and_launches_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "hydra"
    result = run_cli(["plan_only=true", "model=tiny_random", "+strategy=sync_patch",
                      "launcher.devices=2", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr
    assert "| rank | role |" in result.stdout and "band 1/2" in result.stdout
    assert "{" not in result.stdout  # the table and where the files are; the JSON is a file
    assert str(run_dir / "plan.json") in result.stdout.strip().splitlines()[-1]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert [r["rank"] for r in plan["ranks"]] == [0, 1]
    assert "| rank | role |" in (run_dir / "plan.md").read_text()
    # nothing launched: no images, no run record
    assert {p.name for p in run_dir.iterdir()} == {".hydra", "plan.json", "plan.md"}
    out = tmp_path / "out"  # output_dir set: the files go there, Hydra's folder goes away
    result = run_cli(["plan_only=true", "model=tiny_random", f"output_dir={out}",
                      f"hydra.run.dir={tmp_path / 'hydra2'}"])
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"plan.json", "plan.md"}
    assert not (tmp_path / "hydra2").exists()


def test_cli_refuses_what_a_run_refuses(tmp_path: Path) -> None:
    bad = ["model=tiny_random", "+strategy=sync_patch", "launcher.devices=2", "height=72"]
    with pytest.raises(ParaflowError) as refused:
        run_paraflow(tmp_path / "run", bad)
    result = run_cli(["plan_only=true", *bad, f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert result.returncode == 2
    assert str(refused.value) in result.stderr and "valid heights" in result.stderr
    heads = ["model=tiny_random", "+strategy=tensor", "launcher.devices=3"]  # 4 heads
    with pytest.raises(ParaflowError) as refused:
        run_paraflow(tmp_path / "run", heads)
    with pytest.raises(ParaflowError, match="allows: 1, 2, 4") as planned:
        make_plan(compose(heads))
    assert str(planned.value) == str(refused.value)
