"""The pipelines of conf/pipeline/ on one device against diffusers' own, built from the same
saved folder and inputs: txt2img with guidance_rescale, clip_skip and SDXL micro-conditioning,
img2img (SD, SDXL, SD3), inpaint (both UNet kinds) and SDXL base + refiner. Latents within
1e-5, images within 1 grey level."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from paraflow.api import compose
from paraflow.models import load_pipeline
from paraflow.models.components import alias_flattened_clip

from .conftest import read_images, read_latents, run_paraflow

PROMPTS = ["a red circle on the left, blue background", "a blue square"]


def input_image(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    """A smooth random RGB image (a blurred noise field), written as PNG."""
    rng = np.random.default_rng(seed)
    small = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("inputs")
    return [input_image(root / f"in{i}.png", i) for i in range(2)]


def saved_folder(tmp_path_factory: pytest.TempPathFactory, model: str) -> Path:
    """The model config `model` built and written with diffusers' save_pretrained."""
    folder = tmp_path_factory.mktemp(model) / model
    load_pipeline(compose([f"model={model}"]).model).save_pretrained(
        folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_folder(tmp_path_factory, "tiny_sd3_random")


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_folder(tmp_path_factory, "tiny_inpaint_random")


def mask_image(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    """White (repaint) over a disc right of centre with soft grey edges, black elsewhere."""
    rows, cols = np.mgrid[0:size[1], 0:size[0]]
    distance = np.hypot(rows - size[1] / 2, cols - size[0] * 0.6)
    Image.fromarray((np.clip(20 - distance, 0, 4) * 63.75).astype(np.uint8)).save(path)
    return path


def compare(out: Path, pipe: Any, call: dict[str, Any], seeds: list[int]) -> None:
    """paraflow's saved latents and images against `pipe(**call)` with one generator per image
    (latents within 1e-5, images within 1 grey level), stock on as many threads as the run had
    (another count sums in another order: an earlier test may have left torch on one)."""
    pipe.set_progress_bar_config(disable=True)

    def stock(output_type: str) -> Any:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(**call, generator=generators, output_type=output_type).images

    previous = torch.get_num_threads()
    torch.set_num_threads(json.loads((out / "run.json").read_text())["threads_per_rank"])
    try:
        latents, pixels = stock("latent"), stock("np")
    finally:
        torch.set_num_threads(previous)
    ours = read_latents(out)
    assert ours.shape == latents.shape
    assert torch.allclose(ours, latents, atol=1e-5), (ours - latents).abs().max()
    expected = (pixels * 255).round().astype(np.uint8)
    for mine, theirs in zip(read_images(out), expected):
        diff = np.abs(mine.astype(int) - theirs.astype(int))
        assert diff.max() <= 1, f"max pixel difference {diff.max()}"


def prompt_list(prompts: list[str]) -> str:
    return "prompt=[" + ",".join(f"'{p}'" for p in prompts) + "]"


def image_list(paths: list[Path]) -> str:
    return "image=[" + ",".join(f"'{p}'" for p in paths) + "]"


def test_guidance_rescale_and_clip_skip(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny_folders["tiny_random"]
    run_paraflow(tmp_path, ["model=pretrained", f"model.path={folder}", prompt_list(PROMPTS),
                            "seed=3", "guidance_scale=6", "guidance_rescale=0.7", "clip_skip=1",
                            "save_latents=true", "negative_prompt=green"])
    call = dict(prompt=PROMPTS, negative_prompt=["green"] * 2, height=64, width=64,
                num_inference_steps=3, guidance_scale=6.0, guidance_rescale=0.7, clip_skip=1)
    # diffusers' clip_skip reads text_encoder.text_model, gone in transformers >= 5.6
    # (diffusers#14124): the same alias paraflow sets, then diffusers' own code.
    stock = alias_flattened_clip(StableDiffusionPipeline.from_pretrained(folder))
    compare(tmp_path, stock, call, [3, 4])


def test_rescale_and_clip_skip_change_the_image(tiny_folders: dict[str, Path],
                                                tmp_path: Path) -> None:
    """Each option is read: with it the latents differ from the plain run."""
    base = ["model=pretrained", f"model.path={tiny_folders['tiny_random']}", "save_latents=true"]
    runs = {name: tmp_path / name for name in ("plain", "rescale", "skip")}
    run_paraflow(runs["plain"], base)
    run_paraflow(runs["rescale"], [*base, "guidance_rescale=0.9"])
    run_paraflow(runs["skip"], [*base, "clip_skip=1"])
    plain = read_latents(runs["plain"])
    for name in ("rescale", "skip"):
        assert (read_latents(runs[name]) - plain).abs().max() > 1e-3, name


def test_sdxl_micro_conditioning(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tiny_folders["tiny_xl_random"]
    run_paraflow(tmp_path, [
        "model=pretrained", f"model.path={folder}", prompt_list(PROMPTS[:1]), "seed=5",
        "save_latents=true", "negative_prompt=green", "sdxl.original_size=[128,96]",
        "sdxl.crops_coords_top_left=[8,16]", "sdxl.target_size=[64,64]",
        "sdxl.negative_original_size=[32,32]", "sdxl.negative_crops_coords_top_left=[4,0]",
        "sdxl.negative_target_size=[48,64]", "clip_skip=1"])
    call = dict(prompt=PROMPTS[:1], negative_prompt="green", height=64, width=64,
                num_inference_steps=3, guidance_scale=5.0, original_size=(128, 96),
                crops_coords_top_left=(8, 16), target_size=(64, 64),
                negative_original_size=(32, 32), negative_crops_coords_top_left=(4, 0),
                negative_target_size=(48, 64), clip_skip=1)
    compare(tmp_path, StableDiffusionXLPipeline.from_pretrained(folder), call, [5])


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_img2img_sd(scheduler: str, tiny_folders: dict[str, Path], images: list[Path],
                    tmp_path: Path) -> None:
    folder = tiny_folders["tiny_random"]
    run_paraflow(tmp_path, ["pipeline=img2img", "model=pretrained", f"model.path={folder}",
                            f"scheduler={scheduler}", prompt_list(PROMPTS), image_list(images),
                            "strength=0.6", "steps=5", "seed=7", "save_latents=true"])
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    call = dict(prompt=PROMPTS, image=[Image.open(p) for p in images], strength=0.6,
                num_inference_steps=5, guidance_scale=5.0)
    compare(tmp_path, pipe, call, [7, 8])


def test_img2img_sdxl(tiny_folders: dict[str, Path], images: list[Path], tmp_path: Path) -> None:
    folder = tiny_folders["tiny_xl_random"]
    run_paraflow(tmp_path, ["pipeline=img2img", "model=pretrained", f"model.path={folder}",
                            prompt_list(PROMPTS[:1]), f"image={images[0]}", "strength=0.5",
                            "steps=6", "save_latents=true"])
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    call = dict(prompt=PROMPTS[:1], image=Image.open(images[0]), strength=0.5,
                num_inference_steps=6, guidance_scale=5.0)
    compare(tmp_path, pipe, call, [0])


def test_img2img_sd3(sd3_folder: Path, images: list[Path], tmp_path: Path) -> None:
    run_paraflow(tmp_path, ["pipeline=img2img", "model=pretrained", f"model.path={sd3_folder}",
                            prompt_list(PROMPTS[:1]), f"image={images[1]}", "strength=0.7",
                            "steps=4", "seed=2", "save_latents=true"])
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(sd3_folder)
    call = dict(prompt=PROMPTS[:1], image=Image.open(images[1]), strength=0.7,
                num_inference_steps=4, guidance_scale=5.0, max_sequence_length=16,
                height=64, width=64)
    compare(tmp_path, pipe, call, [2])


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "notes.png"
    path.write_text("not a PNG")
    return path


BAD_INPUTS = [
    (["pipeline=img2img"], "image=None: pipeline=img2img needs image=PATH"),
    (["pipeline=img2img", "image=/no/such.png"], "image=/no/such.png: no such file"),
    (["pipeline=img2img", "image={bad}"], "not a readable image"),
    (["pipeline=img2img", "image={good}", "strength=0"], "strength=0.0: must be in (0, 1]"),
    (["pipeline=img2img", "image={good}", "strength=1.5"], "strength=1.5: must be in (0, 1]"),
    (["pipeline=img2img", "image={good}", "strength=0.1", "steps=5"],
     "strength=0.1 with steps=5 runs no step"),
    (["pipeline=img2img", "image=[{good},{good},{good}]", "prompt=[a,b]"],
     "image: 3 paths for 2 prompts"),
    (["pipeline=inpaint", "image={good}"], "mask=None: pipeline=inpaint needs mask=PATH"),
    (["pipeline=inpaint", "image={good}", "mask={small}"],
     "mask={small}: 32x32, but its image is 64x64"),
    (["pipeline=inpaint", "image={good}", "mask={good}", "model=tiny_sd3_random"],
     "pipeline=inpaint needs a model whose family inpaints"),
    (["image={good}"], "pipeline=txt2img does not read it (pipeline=img2img, inpaint do)"),
    (["strength=0.5"], "strength=0.5: pipeline=txt2img does not read it"),
    (["denoising_end=0.5"], "denoising_end=0.5: pipeline=txt2img does not read it"),
    (["pipeline=sdxl_refine", "model=tiny_xl_random", "denoising_end=1.0"],
     "denoising_end=1.0: must be in (0, 1)"),
    (["pipeline=sdxl_refine", "model=tiny_xl_random", "pipeline.stages.refine.options.model=rf"],
     "options.model=rf, but the pipeline's models are refiner"),
    (["pipeline=sdxl_refine", "model=tiny_xl_random", "+strategy=sync_patch",
      "launcher.devices=2", "pipeline.models.refiner.unet.block_out_channels=[32,64,64,64]",
      "pipeline.models.refiner.unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D,"
      "CrossAttnDownBlock2D,DownBlock2D]", "pipeline.models.refiner.unet.up_block_types="
      "[UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D,UpBlock2D]",
      "pipeline.models.refiner.unet.attention_head_dim=[2,4,4,4]",
      "pipeline.models.refiner.unet.transformer_layers_per_block=[1,1,2,1]"],
     "its denoiser downsamples by 8, model tiny_xl_random's by 4"),
    (["pipeline.stages.encode._target_=no.such.Stage"],
     "pipeline.stages.encode._target_=no.such.Stage: cannot import it"),
]


@pytest.mark.parametrize("overrides,needle", BAD_INPUTS)
def test_bad_inputs_are_named_before_launch(overrides: list[str], needle: str, images: list[Path],
                                            not_an_image: Path, tmp_path: Path) -> None:
    from paraflow.errors import ParaflowError
    from paraflow.validate import validate

    small = input_image(tmp_path / "small.png", 0, (32, 32))
    paths = dict(good=images[0], bad=not_an_image, small=small)
    with pytest.raises(ParaflowError) as error:
        validate(compose([o.format(**paths) for o in overrides]), tmp_path / "out")
    assert needle.format(**paths) in str(error.value)


def test_cli_refuses_a_missing_image_and_writes_nothing(tmp_path: Path) -> None:
    from .conftest import run_cli

    out = tmp_path / "run"
    result = run_cli(["pipeline=img2img", "image=/no/such.png", f"hydra.run.dir={out}"])
    assert result.returncode == 2, result.stderr
    assert "image=/no/such.png: no such file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("unet", ["inpainting", "ordinary"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint(unet: str, strength: float, inpaint_folder: Path, tiny_folders: dict[str, Path],
                 images: list[Path], tmp_path: Path) -> None:
    """Both of diffusers' methods: the 9-channel inpainting UNet and the masked blend."""
    folder = inpaint_folder if unet == "inpainting" else tiny_folders["tiny_random"]
    mask = mask_image(tmp_path / "mask.png")
    out = tmp_path / "out"
    run_paraflow(out, ["pipeline=inpaint", "model=pretrained", f"model.path={folder}",
                       prompt_list(PROMPTS), image_list(images), f"mask={mask}",
                       f"strength={strength}", "steps=5", "seed=11", "save_latents=true"])
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    call = dict(prompt=PROMPTS, image=[Image.open(p) for p in images],
                mask_image=[Image.open(mask)] * 2, strength=strength, num_inference_steps=5,
                guidance_scale=5.0, height=64, width=64)
    compare(out, pipe, call, [11, 12])


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_folder(tmp_path_factory, "tiny_xl_refiner_random")


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sdxl_base_and_refiner(scheduler: str, tiny_folders: dict[str, Path],
                               refiner_folder: Path, tmp_path: Path) -> None:
    """The base denoises to denoising_end, the refiner continues from there on its latents, as
    diffusers' ensemble-of-experts recipe runs the two pipelines."""
    base_folder = tiny_folders["tiny_xl_random"]
    run_paraflow(tmp_path, ["pipeline=sdxl_refine", "model=pretrained",
                            f"model.path={base_folder}", "model@pipeline.models.refiner=pretrained",
                            f"pipeline.models.refiner.path={refiner_folder}",
                            f"scheduler={scheduler}", prompt_list(PROMPTS[:1]), "steps=10",
                            "denoising_end=0.7", "negative_prompt=green", "save_latents=true"])
    base = StableDiffusionXLPipeline.from_pretrained(base_folder)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        if scheduler == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    common = dict(prompt=PROMPTS[:1], negative_prompt="green", num_inference_steps=10,
                  guidance_scale=5.0)

    class Ensemble:
        """The two stock pipelines as one call, for compare()."""

        def set_progress_bar_config(self, **_: Any) -> None:
            pass

        def __call__(self, generator: Any, output_type: str, **_: Any) -> Any:
            handed = base(**common, height=64, width=64, denoising_end=0.7,
                          generator=generator, output_type="latent").images
            return refiner(**common, image=handed, denoising_start=0.7, generator=generator,
                           output_type=output_type)

    compare(tmp_path, Ensemble(), {}, [0])
