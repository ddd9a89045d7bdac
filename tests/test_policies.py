"""Stage policies (pipeline.stages.NAME.precision / placement / offload) run, not only declared.

Each run changes one knob of a base run (fp32, offload=none everywhere) and is compared with it,
on one device in this process and under sync_patch on 2 gloo ranks (one launch):

- precision bf16 / fp16 of encode, denoise or decode: the decoded uint8 image within PSNR >= 40 dB
  (bf16) / >= 50 dB (fp16) of the base image, and not identical to it; the final latents within
  max |Δ| <= 0.5 (bf16) / 0.1 (fp16), and exactly equal when only decode changes. Measured on
  tiny_random and tiny_xl_random, 64², 3 steps, seeds 0 and 7: bf16 >= 48.0 dB and max |Δ| <= 0.18,
  fp16 >= 58.9 dB and <= 0.023 (the worst stage: denoise); a different prompt gives ~30 dB.
- placement=cpu of the text encoder(s), offload=cpu of encode or decode: on a CPU machine nothing
  moves, so the images and latents are exactly equal.

What shows the policy ran: in-process, every stage's modules are traced (dtype and device while
the stage runs, moves to CPU after it); on 2 ranks, run.json's param_bytes (the stage's module
halves in 16-bit). Placement is also checked against a compute device that is not the CPU
(`meta`): the text encoders stay on the CPU and make real embeddings there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from paraflow import graph, policy
from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.graph import StageEnv, StageGraph
from paraflow.metrics import psnr
from paraflow.models import load_pipeline
from paraflow.outputs import OutputSink
from paraflow.registry import build_strategy
from tests.patch_helpers import config, image, latents, run_many, run_single

PSNR_DB = {"bf16": 40.0, "fp16": 50.0}
LATENT_TOL = {"bf16": 0.5, "fp16": 0.1}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STAGE_CLASS = {"encode": "EncodePrompt", "denoise": "Denoise", "decode": "Decode"}
COMPONENTS = {"encode": ("text_encoder",), "denoise": ("unet",), "decode": ("vae",)}

@dataclass(frozen=True)
class Case:
    model: str
    stage: str
    key: str  # precision, placement or offload
    value: str

    @property
    def base(self) -> str:
        return "xl_base" if self.model == "tiny_xl_random" else "base"


SD, XL = "tiny_random", "tiny_xl_random"
CASES = {
    **{f"{stage}_{p}": Case(SD, stage, "precision", p)
       for stage in STAGE_CLASS for p in ("bf16", "fp16")},
    "encode_placement_cpu": Case(SD, "encode", "placement", "cpu"),
    "encode_offload_cpu": Case(SD, "encode", "offload", "cpu"),
    "decode_offload_cpu": Case(SD, "decode", "offload", "cpu"),
    "xl_encode_bf16": Case(XL, "encode", "precision", "bf16"),
    "xl_encode_placement_cpu": Case(XL, "encode", "placement", "cpu"),
}
# The base runs: fp32, compute placement, offload none everywhere (the defaults offload encode
# and decode).
BASE = {"pipeline.stages.encode.offload": "none", "pipeline.stages.decode.offload": "none"}


def _overrides(model: str, knob: dict[str, str]) -> list[str]:
    settings = {**BASE, **knob}
    return [f"model={model}", "height=64", "width=64", "steps=3",
            *(f"{key}={value}" for key, value in settings.items())]


def _configs(tmp: Path, extra: list[str]) -> dict[str, Any]:
    runs = {"base": _overrides(SD, {}), "xl_base": _overrides(XL, {}),
            **{name: _overrides(c.model, {f"pipeline.stages.{c.stage}.{c.key}": c.value})
               for name, c in CASES.items()}}
    return {name: config([*overrides, *extra], tmp / name) for name, overrides in runs.items()}


# --- in-process runs, every stage traced -------------------------------------------------------

@dataclass
class StageTrace:
    stage: str  # the stage class
    device: torch.device  # what the policy gave the stage
    dtype: torch.dtype
    modules: dict[str, tuple[torch.device, torch.dtype]]  # while the stage ran
    offloaded: list[str] = field(default_factory=list)  # modules moved to CPU after it


def _param_state(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def _spy_to(module: nn.Module, moved: list[str], *args: Any, **kwargs: Any) -> Any:
    target = kwargs.get("device", args[0] if args else None)
    if target is not None and not isinstance(target, torch.dtype):
        moved.append(f"{type(module).__name__}->{torch.device(target).type}")
    return type(module).to(module, *args, **kwargs)


def _tracing(traces: list[StageTrace]) -> Any:
    @contextmanager
    def traced(spec: Any, modules: list[nn.Module],
               compute_device: torch.device) -> Iterator[tuple[torch.device, torch.dtype]]:
        moved: list[str] = []
        move_device = policy._move_device

        def asked(module: nn.Module, device: torch.device) -> None:
            """The policy's offload asks for the move; on the CPU it then moves nothing (a
            no-op move would swap every parameter, which FSDP2's sharded modules refuse)."""
            moved.append(f"{type(module).__name__}->{device.type}")
            move_device(module, device)

        try:
            with policy.applied_policy(spec, modules, compute_device) as (device, dtype):
                inside = {type(m).__name__: _param_state(m) for m in modules}
                for module in modules:  # from here on: the stage, then the policy's exit
                    module.__dict__["to"] = functools.partial(_spy_to, module, moved)
                policy._move_device = asked  # type: ignore[assignment]
                yield device, dtype
        finally:
            policy._move_device = move_device  # type: ignore[assignment]
            for module in modules:
                module.__dict__.pop("to", None)
        stage = str(spec._target_).rsplit(".", 1)[-1]
        traces.append(StageTrace(stage, device, dtype, inside, moved))
    return traced


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """name → (record, traces) of every run, one device, in this process."""
    tmp = tmp_path_factory.mktemp("policies1")
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, cfg in _configs(tmp, []).items():
            traces: list[StageTrace] = []
            patch.setattr(graph, "applied_policy", _tracing(traces))
            out[name] = (run_single(cfg), traces)
    return out


def _stage(traces: list[StageTrace], stage: str) -> StageTrace:
    found = [t for t in traces if t.stage == STAGE_CLASS[stage]]
    assert len(found) == 1, [t.stage for t in traces]
    return found[0]


def _check_close(run: dict[str, Any], base: dict[str, Any], stage: str, precision: str) -> None:
    db = psnr(image(run), image(base), peak=255)
    diff = float((latents(run) - latents(base)).abs().max())
    print(f"{stage} {precision}: PSNR {db:.1f} dB, max |latents - fp32| {diff:.4f}")
    assert PSNR_DB[precision] <= db < math.inf  # close, and not the fp32 run again
    assert diff <= (0.0 if stage == "decode" else LATENT_TOL[precision])


def _check_equal(run: dict[str, Any], base: dict[str, Any]) -> None:
    assert torch.equal(latents(run), latents(base))
    assert torch.equal(image(run), image(base))


@pytest.mark.parametrize("stage", list(STAGE_CLASS))
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_one_device(single: dict[str, Any], stage: str, precision: str) -> None:
    (run, traces), (base, _) = single[f"{stage}_{precision}"], single["base"]
    _check_close(run, base, stage, precision)
    for other in STAGE_CLASS:
        trace = _stage(traces, other)
        want = DTYPES[precision] if other == stage else torch.float32
        assert trace.dtype == want
        assert {dtype for _, dtype in trace.modules.values()} == {want}


def test_precision_casts_both_text_encoders(single: dict[str, Any]) -> None:
    (run, traces), (base, _) = single["xl_encode_bf16"], single["xl_base"]
    _check_close(run, base, "encode", "bf16")
    modules = _stage(traces, "encode").modules
    assert len(modules) == 2 and {d for _, d in modules.values()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["encode_placement_cpu", "xl_encode_placement_cpu"])
def test_placement_cpu_one_device(single: dict[str, Any], name: str) -> None:
    (run, traces), (base, _) = single[name], single[CASES[name].base]
    _check_equal(run, base)
    trace = _stage(traces, "encode")
    assert trace.device == torch.device("cpu")
    assert len(trace.modules) == (2 if name.startswith("xl_") else 1)
    assert {device.type for device, _ in trace.modules.values()} == {"cpu"}


@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_offload_one_device(single: dict[str, Any], stage: str) -> None:
    (run, traces), (base, base_traces) = single[f"{stage}_offload_cpu"], single["base"]
    _check_equal(run, base)
    assert _stage(traces, stage).offloaded  # moved to the CPU once the stage was done
    for other in STAGE_CLASS:
        assert not _stage(base_traces, other).offloaded  # offload=none moves nothing
        if other != stage:
            assert not _stage(traces, other).offloaded


@pytest.mark.parametrize("model", ["tiny_random", "tiny_xl_random"])
def test_placement_cpu_against_another_compute_device(model: str, tmp_path: Path) -> None:
    """With the rank's device `meta`, placement=cpu keeps the text encoders on the CPU (real
    embeddings, equal to an all-CPU encode); placement=compute moves them to `meta`."""
    def encode(device: str, placement: str) -> tuple[Any, Any]:
        cfg = config(_overrides(model, {"pipeline.stages.encode.placement": placement}),
                     tmp_path / f"{device}_{placement}")
        ctx = ParallelContext(0, 1, 0, torch.device(device), Communicator(None, 1, 0))
        pipe = load_pipeline(cfg.model)
        env = StageEnv(cfg=cfg, ctx=ctx, pipe=pipe, strategy=build_strategy(cfg.strategy),
                       sink=OutputSink())
        stages = OmegaConf.create({"encode": cfg.pipeline.stages.encode})
        with torch.inference_mode():
            values = StageGraph.from_config(stages).run(env, {"prompts": ["a red circle"],
                                                              "image_ids": [0]})
        encoders = [m for n, m in pipe.components.items() if n.startswith("text_encoder")
                    and m is not None]
        return values["conditioning"], {p.device.type for m in encoders for p in m.parameters()}

    kept, kept_on = encode("meta", "cpu")
    want, _ = encode("cpu", "compute")
    moved, moved_on = encode("meta", "compute")
    assert kept_on == {"cpu"} and kept.embeds.device.type == "cpu"
    assert torch.equal(kept.embeds, want.embeds)
    assert moved_on == {"meta"} and moved.embeds.device.type == "meta"


# --- 2 ranks, sync_patch: one launch -----------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("policies2")
    cfgs = _configs(tmp, ["+strategy=sync_patch", "launcher.devices=2"])
    return dict(zip(cfgs, run_many(list(cfgs.values()))))


@pytest.mark.slow
def test_policies_on_two_ranks(two_ranks: dict[str, Any]) -> None:
    for name, case in CASES.items():
        run, base = two_ranks[name], two_ranks[case.base]
        assert run["world_size"] == 2 and run["strategy"] == "sync_patch"
        if case.key == "precision":
            _check_close(run, base, case.stage, case.value)
            for component, per_rank in base["param_bytes"].items():
                halved = any(component.startswith(c) for c in COMPONENTS[case.stage])
                assert run["param_bytes"][component] == (
                    [b // 2 for b in per_rank] if halved else per_rank), (name, component)
        else:
            _check_equal(run, base)
