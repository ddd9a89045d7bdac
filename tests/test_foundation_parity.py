"""Single-device paraflow against diffusers' own pipelines, built from the same saved folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .conftest import read_images, read_latents, run_paraflow

PROMPT = "a red circle on the left, blue background"
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
CASES = {"tiny_random": StableDiffusionPipeline, "tiny_xl_random": StableDiffusionXLPipeline}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_same_image_as_diffusers(name: str, scheduler: str, tiny_folders: dict[str, Path],
                                 tmp_path: Path) -> None:
    folder = tiny_folders[name]
    out = tmp_path / "paraflow"
    run_paraflow(out, ["model=pretrained", f"model.path={folder}", f"scheduler={scheduler}",
                       f"prompt='{PROMPT}'", "seed=3", "guidance_scale=4.5", "save_latents=true",
                       "negative_prompt=green"])

    pipe = CASES[name].from_pretrained(folder)
    # Swap the scheduler as a diffusers user would: the new class from the saved schedule.
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt="green", height=64, width=64,
                  num_inference_steps=3, guidance_scale=4.5)
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(3),
                   output_type="latent").images
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np").images

    ours = read_latents(out)
    assert ours.shape == latents.shape
    # Same operations in the same order on the same CPU: equal to float rounding (tol 1e-5).
    assert torch.allclose(ours, latents, atol=1e-5), (ours - latents).abs().max()
    expected = (images * 255).round().astype(np.uint8)
    diff = np.abs(read_images(out)[0].astype(int) - expected[0].astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
