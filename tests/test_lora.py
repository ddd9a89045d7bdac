"""LoRA adapters (model.lora) on one device against diffusers' own load_lora_weights on the same
saved folder: two adapters at once (attention and convolution layers), unfused and fused, latents
within 1e-5 and images within 1 grey level; and the refusals before launch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline

from paraflow.api import compose
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.models import load_pipeline
from paraflow.tools.random_lora import save_random_lora
from paraflow.validate import validate

from .conftest import read_latents, run_paraflow
from .test_pipelines import compare

PROMPT = "a red circle on the left, blue background"
CONVS = ["conv1", "conv2"]  # the resnets' 3×3 convolutions


def lora_arg(loras: list[tuple[Path, float]]) -> str:
    return "model.lora=[" + ",".join(f"{{path:'{p}',scale:{s}}}" for p, s in loras) + "]"


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    made = {
        "attention": save_random_lora(load_pipeline(compose(["model=tiny_random"]).model),
                                      root / "attention"),
        "conv": save_random_lora(load_pipeline(compose(["model=tiny_random"]).model),
                                 root / "conv", targets=CONVS, seed=1),
        "xl": save_random_lora(load_pipeline(compose(["model=tiny_xl_random"]).model),
                               root / "xl"),
    }
    return made


@pytest.mark.parametrize("fuse", [False, True])
def test_two_loras_equal_diffusers(fuse: bool, tiny_folders: dict[str, Path],
                                   loras: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny_folders["tiny_random"]
    pair = [(loras["attention"], 0.8), (loras["conv"], 0.5)]
    run_paraflow(tmp_path, ["model=pretrained", f"model.path={folder}", lora_arg(pair),
                            f"model.lora_fuse={fuse}", f"prompt='{PROMPT}'", "seed=2",
                            "save_latents=true"])
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    for name, (path, _) in zip(("a", "b"), pair):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    if fuse:
        pipe.fuse_lora(adapter_names=["a", "b"])
        pipe.unload_lora_weights()
    call = dict(prompt=[PROMPT], height=64, width=64, num_inference_steps=3, guidance_scale=5.0)
    compare(tmp_path, pipe, call, [2])


def test_the_lora_changes_the_image(loras: dict[str, Path], tmp_path: Path) -> None:
    base = ["model=tiny_random", "save_latents=true"]
    run_paraflow(tmp_path / "plain", base)
    run_paraflow(tmp_path / "lora", [*base, lora_arg([(loras["attention"], 0.8)])])
    diff = (read_latents(tmp_path / "lora") - read_latents(tmp_path / "plain")).abs().max()
    assert float(diff) > 1e-3


@pytest.mark.parametrize("overrides,needle", [
    ([lora_arg([(Path("/no/such/lora"), 1.0)])], "model.lora[0].path=/no/such/lora: no such"),
    (["{xl}"], "model.lora[0] (pytorch_lora_weights.safetensors): layer "),
    (["{xl}", "model=tiny_sd3_random"], "adapts layer 'down_blocks"),
    (["{xl}", "model=tiny_pixart_random"], "is a pixart model, whose diffusers pipeline loads"),
    (["model=tiny_random", "{attention}", "+strategy=tensor", "launcher.devices=2"],
     "strategy=tensor shards plain layers, not unfused LoRA adapters"),
])
def test_bad_loras_are_refused_before_launch(overrides: list[str], needle: str,
                                             loras: dict[str, Path], tmp_path: Path) -> None:
    filled = [lora_arg([(loras[o[1:-1]], 1.0)]) if o.startswith("{") else o for o in overrides]
    order = sorted(filled, key=lambda o: not o.startswith("model="))  # the model first
    with pytest.raises(ParaflowError) as error:
        validate(compose(order), tmp_path / "out")
    assert needle in str(error.value)


def test_fused_lora_is_accepted_by_tensor(loras: dict[str, Path], tmp_path: Path) -> None:
    validate(compose(["model=tiny_random", lora_arg([(loras["attention"], 1.0)]),
                      "model.lora_fuse=true", "+strategy=tensor", "launcher.devices=2"]), None)


def adapters_arg(named: dict[str, Path]) -> str:
    return "model.adapters=[" + ",".join(f"{{name:{n},path:'{p}'}}" for n, p in named.items()) + "]"


def choice_arg(chosen: list[tuple[str, float]]) -> str:
    return "lora=[" + ",".join(f"{{name:{n},scale:{s}}}" for n, s in chosen) + "]"


def test_switched_adapters_equal_the_same_loras_loaded_alone(loras: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """One session with two switched adapters, three generations (one on, none, both): each
    equals a run that loads just those LoRAs (model.lora) or none. The same operations run in
    both (peft skips an adapter that is off), so the latents are bit-identical."""
    from paraflow.models.lora import activate_adapters
    from paraflow.session import Session

    base = ["model=tiny_random", "steps=3", f"prompt='{PROMPT}'", "seed=2", "save_latents=true"]
    named = {"ink": loras["attention"], "sky": loras["conv"]}
    cfg = compose([*base, adapters_arg(named)])
    session = Session(ParallelContext.single(torch.device("cpu")), cfg)
    cases = {
        "ink": ([("ink", 0.8)], [(loras["attention"], 0.8)]),
        "none": ([], []),
        "both": ([("sky", 0.5), ("ink", 1.2)], [(loras["conv"], 0.5), (loras["attention"], 1.2)]),
    }
    for name, (chosen, alone) in cases.items():
        switched = session.generate(compose([*base, adapters_arg(named), choice_arg(chosen)]),
                                    [PROMPT], keep_latents=True).sink.latents[0]
        reference = compose([*base, *([lora_arg(alone)] if alone else [])])
        loaded = Session(ParallelContext.single(torch.device("cpu")), reference)
        expected = loaded.generate(reference, [PROMPT], keep_latents=True).sink.latents[0]
        assert torch.equal(switched, expected), name
    activate_adapters(session.pipe, cfg.model, [])  # and the plain model is back
    assert not any(layer.active_adapters for layer in lora_layers(session.pipe.unet)
                   if not layer.disable_adapters)


def lora_layers(module: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("overrides,needle", [
    (["{adapters}", "lora=[{name:nope}]"], "lora[0].name=nope: not one of model.adapters "
                                            "(ink, sky)"),
    (["lora=[{name:ink}]"], "lora[0].name=ink: not one of model.adapters (none are loaded)"),
    (["{adapters}", "lora=[{name:ink},{name:ink}]"], "lora[1].name=ink: chosen twice"),
    (["model.adapters=[{name:lora0,path:'{attention}'}]"], "model.adapters[0].name=lora0: a name"),
    (["model.adapters=[{name:'a.b',path:'{attention}'}]"], "model.adapters[0].name=a.b: a name"),
    (["model.adapters=[{name:a,path:'{attention}'},{name:a,path:'{conv}'}]"],
     "model.adapters[1].name=a: given twice"),
    (["model.adapters=[{name:a,path:/no/such}]"], "model.adapters[0].path=/no/such: no such"),
    (["{adapters}", "+strategy=tensor", "launcher.devices=2"],
     "adapters switched per generation (model.adapters, a service's serve.lora) cannot be"),
])
def test_bad_switched_adapters_are_refused_before_launch(overrides: list[str], needle: str,
                                                         loras: dict[str, Path]) -> None:
    named = {"ink": loras["attention"], "sky": loras["conv"]}
    filled = [adapters_arg(named) if o == "{adapters}" else
              o.replace("{attention}", str(loras["attention"])).replace("{conv}",
                                                                        str(loras["conv"]))
              for o in overrides]
    with pytest.raises(ParaflowError) as error:
        validate(compose(["model=tiny_random", *filled]), None)
    assert needle in str(error.value)
