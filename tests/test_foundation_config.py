"""Every config file composes and instantiates; bad input fails early with a named value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from paraflow.api import CONF_DIR, compose
from paraflow.errors import ParaflowError
from paraflow.models import load_pipeline
from paraflow.registry import available_strategies, build_strategy
from paraflow.validate import validate

from .conftest import run_cli

# The run config's groups (bench/ is the benchmark command's own config tree).
GROUPS = sorted(p.name for p in CONF_DIR.iterdir()
                if p.is_dir() and p.name not in ("bench", "__pycache__"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_has_no_strategy() -> None:
    cfg = compose()
    assert cfg.strategy is None and cfg.model.name == "tiny" and cfg.launcher.devices == 1


@pytest.mark.parametrize("name", group_options("model"))
def test_model_configs_compose(name: str) -> None:
    needs_path = name == "pretrained"
    cfg = compose([f"model={name}", *(["model.path=somewhere"] if needs_path else [])])
    assert cfg.model._target_ and cfg.model.name == name


@pytest.mark.parametrize("name", group_options("scheduler"))
def test_scheduler_configs_instantiate(name: str) -> None:
    flow = name.startswith("flow")  # flow-matching schedulers go with SD3 and Flux
    cfg = compose([f"scheduler={name}", *(["model=tiny_sd3_random"] if flow else [])])
    pipe = load_pipeline(cfg.model, cfg.scheduler)
    assert type(pipe.scheduler).__name__ == cfg.scheduler._target_.rsplit(".", 1)[1]
    if flow:
        assert pipe.scheduler.config.shift == 3.0  # the model's schedule kept
    else:
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("name", group_options("strategy"))
def test_strategy_configs_match_entry_points(name: str) -> None:
    cfg = compose([f"+strategy={name}"])
    found = available_strategies()
    assert cfg.strategy.name in found
    assert "_target_" not in cfg.strategy  # the entry point is the one way to a strategy
    assert build_strategy(cfg.strategy).name == cfg.strategy.name


def test_stage_policy_overridable() -> None:
    cfg = compose(["pipeline.stages.decode.precision=bf16", "pipeline.stages.encode.offload=none"])
    assert cfg.pipeline.stages.decode.precision.value == "bf16"
    assert cfg.pipeline.stages.encode.offload.value == "none"


@pytest.mark.parametrize("overrides,needle", [
    (["+strategy=nonexistent"], "strategy/nonexistent"),
    (["model=nonexistent"], "model/nonexistent"),
    (["heigth=64"], "heigth"),
    (["pipeline.stages.decode.precisoin=fp32"], "precisoin"),
    (["pipeline.stages.decode.precision=fp8"], "fp8"),
    (["launcher.devices=two"], "devices"),
])
def test_compose_errors_name_the_value(overrides: list[str], needle: str) -> None:
    with pytest.raises(HydraException) as err:
        compose(overrides)
    assert needle in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("overrides,needle", [
    (["height=62"], "height=62: must be a positive multiple of 4"),
    (["width=0"], "width=0"),
    (["steps=0"], "steps=0: must be at least 1"),
    (["guidance_scale=-1"], "guidance_scale=-1"),
    (["model=pretrained", "model.path=/no/such"], "model.path=/no/such: no such folder"),
    (["images_per_prompt=0"], "images_per_prompt=0"),
    (["prompt=[]"], "prompt=[]"),
])
def test_validation_errors_name_the_value(overrides: list[str], needle: str,
                                          tmp_path: Path) -> None:
    with pytest.raises(ParaflowError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate(compose(overrides), tmp_path / "out")


def test_too_many_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParaflowError, match="launcher.devices=2 but this machine has 1 CUDA"):
        validate(compose(["launcher.devices=2"]), None)
    # On CPU any number of ranks may run.
    validate(compose(["launcher.devices=3", "launcher.accelerator=cpu"]), None)


def test_incomplete_and_unsupported_folders(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(ParaflowError, match="KandinskyV22Pipeline is not supported"):
        validate(compose(["model=pretrained", f"model.path={tmp_path}"]), None)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "unet").mkdir()
    with pytest.raises(ParaflowError, match="incomplete .* missing vae, text_encoder"):
        validate(compose(["model=pretrained", f"model.path={tmp_path}"]), None)
    with pytest.raises(ParaflowError, match="model_index.json is missing"):
        validate(compose(["model=pretrained", f"model.path={tmp_path / 'unet'}"]), None)


@pytest.mark.parametrize("args,needle", [
    (["steps=0"], "steps=0"),
    (["guidance_scale=-2"], "guidance_scale=-2"),
    (["model=pretrained", "model.path=/no/such/folder"], "no such folder"),
])
def test_bad_input_is_refused(args: list[str], needle: str) -> None:
    """As the CLI refuses it (test_cli_bad_input: one case of validation's, through the CLI)."""
    with pytest.raises(ParaflowError, match=needle):
        validate(compose(args), None)


@pytest.mark.parametrize("args,needle", [
    (["+strategy=nonexistent"], "Could not find 'strategy/nonexistent'"),
    (["model=nonexistent"], "Could not find 'model/nonexistent'"),
    (["heigth=64"], "heigth"),
    (["height=65"], "height=65: must be a positive multiple of 4"),
])
def test_cli_bad_input(args: list[str], needle: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli([*args, f"hydra.run.dir={out}"])
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), f"a refused run left {list(out.rglob('*'))}"


def test_cli_cfg_job_prints_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli(["--cfg", "job", "+strategy=data", "steps=7", f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.strategy.name == "data" and printed.steps == 7
    assert not out.exists()
