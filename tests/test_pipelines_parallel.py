"""img2img, inpaint and LoRA under the strategies, 2 and 3 gloo ranks, against one device.

sync_patch and tensor are exact: final fp32 latents within 1e-4 max abs difference, images
within 1 grey level. The VAE encodes the input image in bands of rows (halos, shared GroupNorm
statistics; the encoder's padded downsamplers take their extra row from the band below); every
rank then holds the whole encoded image and mask, and the denoiser's input, the inpainting
UNet's extra channels included, is cut into the noise's bands. displaced_patch with a warm-up
as long as the steps actually run is exact too, which holds only if its warm-up counts from
img2img's first step, not from step 0 of the full schedule. data deals (image, mask, prompt)
tuples: each image equals a single run of its own.
SDXL base + refiner: both UNets laid out by the strategy, the refiner's warm-up and state
starting afresh at its first step. Unfused LoRA (peft layers on attention and on 3×3
convolutions, whose down factor the patch layers give halos like any convolution) under
sync_patch, ulysses and displaced patch (warm-up over every step); fused LoRA under tensor.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from paraflow.api import compose
from paraflow.models import load_pipeline
from paraflow.tools.random_lora import save_random_lora
from tests.patch_helpers import check_exact, config, latents, run_against_one_device, run_many
from tests.test_lora import CONVS, lora_arg
from tests.test_pipelines import input_image, mask_image

pytestmark = pytest.mark.slow  # multi-process launches of whole runs

SYNC, TENSOR = ["+strategy=sync_patch"], ["+strategy=tensor"]
# Widths that split into 3 (channels, heads and GroupNorm groups), for tensor on 3 ranks.
THIRDS = ["model.unet.block_out_channels=[48,96,96]", "model.unet.norm_num_groups=6",
          "model.unet.attention_head_dim=6"]

# SDXL base + refiner: two models' UNets, both parallelized, in one graph.
REFINE = ["pipeline=sdxl_refine", "model=tiny_xl_random", "height=64", "width=64", "steps=5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    found = {f"image{i}": input_image(root / f"in{i}.png", i) for i in range(5)}
    found["tall"] = input_image(root / "tall.png", 9, (64, 96))
    found["mask"] = mask_image(root / "mask.png")
    found["tall_mask"] = mask_image(root / "tall_mask.png", (64, 96))
    for name, model in (("lora", ["model=tiny_random"]), ("lora_thirds", ["model=tiny_random",
                                                                         *THIRDS])):
        found[name] = save_random_lora(load_pipeline(compose(model).model), root / name)
    found["lora_conv"] = save_random_lora(load_pipeline(compose(["model=tiny_random"]).model),
                                          root / "lora_conv", targets=CONVS, seed=1)
    return found


def img2img(paths: dict[str, Path], tall: bool = False) -> list[str]:
    image, size = (paths["tall"], "height=96") if tall else (paths["image0"], "height=64")
    return ["model=tiny_random", "pipeline=img2img", f"image={image}", size, "width=64",
            "strength=0.6", "steps=5"]


def inpaint(paths: dict[str, Path], model: str, tall: bool = False) -> list[str]:
    image, mask = ("tall", "tall_mask") if tall else ("image0", "mask")
    return [f"model={model}", "pipeline=inpaint", f"image={paths[image]}",
            f"mask={paths[mask]}", f"height={96 if tall else 64}", "width=64", "strength=0.8",
            "steps=4"]


def lora(paths: dict[str, Path], fuse: bool, tall: bool = False,
         thirds: bool = False) -> list[str]:
    """txt2img with LoRA: attention and convolution adapters (one, on the widened model)."""
    pairs = [(paths["lora_thirds"], 0.8)] if thirds else [(paths["lora"], 0.8),
                                                        (paths["lora_conv"], 0.5)]
    return ["model=tiny_random", *(THIRDS if thirds else []), lora_arg(pairs),
            f"model.lora_fuse={fuse}", f"height={96 if tall else 64}", "width=64", "steps=3"]


def _cases(devices: int, paths: dict[str, Path]) -> dict[str, tuple[list[str], list[str]]]:
    if devices == 2:
        return {
            "img2img_sync": (img2img(paths), SYNC),
            "img2img_sync_whole_encode": (img2img(paths), [
                *SYNC, "pipeline.stages.encode_image.parallel=none"]),
            "img2img_tensor": (img2img(paths), TENSOR),
            "img2img_displaced_warm": (img2img(paths), ["+strategy=distrifusion",
                                                        "strategy.warmup_steps=2"]),
            "inpaint9_sync": (inpaint(paths, "tiny_inpaint_random"), SYNC),
            "inpaint9_tensor": (inpaint(paths, "tiny_inpaint_random"), TENSOR),
            "blend_sync": (inpaint(paths, "tiny_random"), SYNC),
            "lora_sync": (lora(paths, fuse=False), SYNC),
            "lora_fused_tensor": (lora(paths, fuse=True), TENSOR),
            "lora_ulysses": (lora(paths, fuse=False), ["+strategy=ulysses"]),
            "lora_displaced_warm": (lora(paths, fuse=False), ["+strategy=distrifusion",
                                                              "strategy.warmup_steps=2"]),
            "refine_sync": (REFINE, SYNC),
            "refine_tensor": (REFINE, TENSOR),
            "refine_data": ([*REFINE, "prompt=[a red circle,a blue square]"], ["+strategy=data"]),
        }
    return {
        "img2img_sync": (img2img(paths, tall=True), SYNC),
        "img2img_tensor": ([*img2img(paths), *THIRDS], TENSOR),
        "inpaint9_sync": (inpaint(paths, "tiny_inpaint_random", tall=True), SYNC),
        "inpaint9_tensor": ([*inpaint(paths, "tiny_inpaint_random"), *THIRDS], TENSOR),
        "blend_sync": (inpaint(paths, "tiny_random", tall=True), SYNC),
        "lora_sync": (lora(paths, fuse=False, tall=True), SYNC),
        "lora_fused_tensor": (lora(paths, fuse=True, thirds=True), TENSOR),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Any:
    return run_against_one_device(_cases(2, inputs), 2, tmp_path_factory.mktemp("pipe2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory, inputs: dict[str, Path]) -> Any:
    return run_against_one_device(_cases(3, inputs), 3, tmp_path_factory.mktemp("pipe3"))


NAMES_ONLY: dict[str, Path] = defaultdict(Path)  # the case names, before any input exists


@pytest.mark.parametrize("name", sorted(_cases(2, NAMES_ONLY)))
def test_two_ranks_equal_one_device(two_ranks: dict[str, Any], name: str) -> None:
    check_exact(*two_ranks[name])


@pytest.mark.parametrize("name", sorted(_cases(3, NAMES_ONLY)))
def test_three_ranks_equal_one_device(three_ranks: dict[str, Any], name: str) -> None:
    check_exact(*three_ranks[name])


def test_the_image_is_encoded_in_bands(two_ranks: dict[str, Any]) -> None:
    """Under a patch strategy the VAE encoder runs in bands (its halos and GroupNorm sums are
    traffic outside the denoising steps); with parallel=none every rank encodes it whole. Both
    are exact (above)."""
    banded, _ = two_ranks["img2img_sync"]
    whole, _ = two_ranks["img2img_sync_whole_encode"]
    assert min(banded["comm_bytes_outside_steps"]) > max(whole["comm_bytes_outside_steps"])


def test_displaced_warm_up_counts_from_the_first_step_run(two_ranks: dict[str, Any],
                                                          inputs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """With one warm-up step too few for the 3 steps img2img runs, displaced patch is no longer
    exact: the warm-up is what made the case above exact, and it covers img2img's steps."""
    short = config([*img2img(inputs), "+strategy=distrifusion", "strategy.warmup_steps=1",
                    "launcher.devices=2"], tmp_path / "short")
    record = run_many([short])[0]
    _, ref = two_ranks["img2img_displaced_warm"]
    assert float((latents(record) - latents(ref)).abs().max()) > 1e-4


def test_data_deals_image_prompt_pairs(inputs: dict[str, Path], tmp_path: Path) -> None:
    """5 (image, mask, prompt) tuples dealt over 2 ranks: image i equals a one-device run of
    tuple i alone with seed + i (the seed image i gets in the batch)."""
    from tests.patch_helpers import run_single

    prompts = ["a red circle", "a blue square", "green", "a red square", "blue circle"]
    images = [str(inputs[f"image{i}"]) for i in range(5)]
    base = inpaint(inputs, "tiny_random")
    both = config([*base, "prompt=[" + ",".join(prompts) + "]",
                   "image=[" + ",".join(images) + "]", "+strategy=data", "launcher.devices=2"],
                  tmp_path / "data")
    dealt = latents(run_many([both])[0])
    for i in range(5):
        alone = config([*base, f"prompt='{prompts[i]}'", f"image={images[i]}", f"seed={i}"],
                       tmp_path / f"alone{i}")
        diff = float((dealt[i] - latents(run_single(alone))[0]).abs().max())
        assert diff <= 1e-4, f"image {i}: {diff:.2e}"
