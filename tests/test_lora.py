"""LoRA adapters (model.lora) on one device against diffusers' own load_lora_weights on the same
saved folder: two adapters at once (attention and convolution layers), unfused and fused, latents
within 1e-5 and images within 1 grey level; and the refusals before launch."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from paraflow.api import compose
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
