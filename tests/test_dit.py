"""Diffusion transformers (PixArt-α/Σ, SD3, Flux) on one device against diffusers' own
pipelines built from the same saved folder, and the model facts the strategies read from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
)

from paraflow.api import compose
from paraflow.models import load_pipeline

from .conftest import read_images, read_latents, run_paraflow

PROMPT = "a red circle on the left, blue background"
# PixArt-α with its resolution / aspect-ratio conditioning on (the transformer reads it when
# its sample size is 128, as the published α is); its embeddings split the width in three.
ALPHA = ["model.arch=pixart_alpha", "model.transformer.sample_size=128",
         "model.transformer.use_additional_conditions=true",
         "model.transformer.num_attention_heads=3", "model.transformer.cross_attention_dim=24"]
PIXART_CALL = {"use_resolution_binning": False, "clean_caption": False,
               "negative_prompt": "green"}
# name → (stock pipeline, model overrides, the stock call's own arguments). Flux takes no
# negative prompt (no classifier-free guidance: its guidance scale is an embedded input).
CASES: dict[str, tuple[Any, list[str], dict[str, Any]]] = {
    "sigma": (PixArtSigmaPipeline, ["model=tiny_pixart_random"], PIXART_CALL),
    "alpha": (PixArtAlphaPipeline, ["model=tiny_pixart_random", *ALPHA], PIXART_CALL),
    "sd3": (StableDiffusion3Pipeline, ["model=tiny_sd3_random"], {"negative_prompt": "green"}),
    "flux": (FluxPipeline, ["model=tiny_flux_random"], {}),
    # Resolution binning, the stock default: a sample size of 32 has the 256² bins; 64 × 96
    # is generated at its nearest bin (208 × 304), then resized and cropped back.
    "sigma_binned": (PixArtSigmaPipeline, ["model=tiny_pixart_random",
                                           "model.transformer.sample_size=32"],
                     {**PIXART_CALL, "use_resolution_binning": True}),
}


@pytest.fixture(scope="module")
def dit_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit")
    folders = {}
    for name, (_, overrides, _) in CASES.items():
        pipe = load_pipeline(compose(overrides).model)
        pipe.save_pretrained(root / name, safe_serialization=True)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_image_as_diffusers(name: str, dit_folders: dict[str, Path],
                                 tmp_path: Path) -> None:
    folder, out = dit_folders[name], tmp_path / "paraflow"
    stock_class, _, call = CASES[name]
    negative = ["negative_prompt=green"] if "negative_prompt" in call else []
    binning = f"resolution_binning={call.get('use_resolution_binning', True)}"
    run_paraflow(out, ["model=pretrained", f"model.path={folder}", f"prompt='{PROMPT}'",
                       "seed=3", "guidance_scale=4.5", "save_latents=true", "height=64",
                       "width=96", binning, *negative])
    pipe = stock_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, height=64, width=96, num_inference_steps=3,
                  guidance_scale=4.5, max_sequence_length=16, **call)
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(3),
                   output_type="latent").images
    if stock_class is FluxPipeline:  # packed 2×2 patches → latent image
        latents = FluxPipeline._unpack_latents(latents, 64, 96, pipe.vae_scale_factor)
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np").images

    ours = read_latents(out)
    assert ours.shape == latents.shape
    assert torch.allclose(ours, latents, atol=1e-5), (ours - latents).abs().max()  # tol 1e-5
    expected = (images * 255).round().astype(np.uint8)
    diff = np.abs(read_images(out)[0].astype(int) - expected[0].astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"


def test_flux_keeps_its_flow_schedule_under_the_default_scheduler() -> None:
    """scheduler=ddim (the default) does not fit a flow-matching model; an explicit flow
    scheduler's options apply."""
    kept = load_pipeline(compose(["model=tiny_flux_random"]).model, compose([]).scheduler)
    assert type(kept.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert kept.scheduler.config.use_dynamic_shifting
    shifted = load_pipeline(compose(["model=tiny_sd3_random"]).model,
                            compose(["scheduler=flow_euler", "+scheduler.options.shift=1.5"])
                            .scheduler)
    assert shifted.scheduler.config.shift == 1.5


def test_cfg_split_on_a_guidance_distilled_model_is_refused() -> None:
    from paraflow.errors import ParaflowError
    from paraflow.validate import validate

    cfg = compose(["model=tiny_flux_random", "+strategy=sync_patch", "strategy.cfg_split=true",
                   "launcher.devices=2"])
    with pytest.raises(ParaflowError, match=r"tiny_flux_random is guidance-distilled.*no "
                                            r"unconditional branch"):
        validate(cfg, None, devices=False)


def _patch_bytes_per_step(ranks: int, height: int, width: int, layers: int, inner: int,
                          out_channels: int, patch: int = 2, batch: int = 2) -> int:
    """sync_patch on a transformer, per rank and step, fp32, ring all-gathers (a piece times
    ranks − 1): each layer's keys and values of the band's tokens, then the output band."""
    rows, cols = height // 8 // ranks, width // 8  # latent rows of a band, latent columns
    tokens = (rows // patch) * (cols // patch)
    attention = layers * batch * tokens * 2 * inner * 4 * (ranks - 1)
    output = batch * out_channels * rows * cols * 4 * (ranks - 1)
    return attention + output


@pytest.mark.parametrize("strategy", ["sync_patch", "distrifusion"])
def test_planned_patch_bytes_equal_the_formula(strategy: str) -> None:
    """The planner replays the strategy (test_plan.py checks it against gloo's counts); here its
    bytes per step against the closed form, for 4 bands of a 128×96 image."""
    from paraflow.plan import make_plan

    plan = make_plan(compose(["model=tiny_pixart_random", f"+strategy={strategy}",
                              "launcher.devices=4", "height=128", "width=96", "steps=6"]))
    # The output band is the prediction: PixArt's learned-variance channels are dropped first.
    want = _patch_bytes_per_step(4, 128, 96, layers=2, inner=32, out_channels=4)
    for row in plan.ranks:  # displaced patch sends as much, later
        assert row.comm_per_step == [want] * 6


def _ulysses_bytes_per_step(ranks: int, height: int, width: int, layers: int, inner: int,
                            out_channels: int, patch: int = 2, batch: int = 2) -> int:
    """ulysses, per rank and step, fp32: each layer's two all-to-alls (queries, keys and values
    out, the attention output back: 4 · band tokens · width, all but this rank's share of the
    heads), then the output band's all-gather as in sync_patch."""
    rows, cols = height // 8 // ranks, width // 8
    tokens = (rows // patch) * (cols // patch)
    attention = layers * 4 * batch * tokens * inner * 4 * (ranks - 1) // ranks
    return attention + batch * out_channels * rows * cols * 4 * (ranks - 1)


def test_planned_ulysses_bytes_equal_the_formula() -> None:
    from paraflow.plan import make_plan

    plan = make_plan(compose(["model=tiny_pixart_random", "+strategy=ulysses",
                              "launcher.devices=4", "height=128", "width=96", "steps=2"]))
    want = _ulysses_bytes_per_step(4, 128, 96, layers=2, inner=32, out_channels=4)
    assert [row.comm_per_step for row in plan.ranks] == [[want] * 2] * 4


def _flux_bytes_per_step(strategy: str, ranks: int, height: int, width: int) -> int:
    """tiny_flux_random (1 double- and 2 single-stream blocks, width 32, 16 text tokens, 2×2
    packed tokens of 16 channels, no classifier-free guidance: batch 1), fp32, per rank and step.
    sync_patch: each attention's band keys and values to every other rank, then the output band.
    ulysses: each attention's two all-to-alls (4 · band tokens · width · (N − 1)/N) and the
    all-gather of the text's attention output by head share, then the output band.
    tensor: ring all-reduces (2 · (N − 1)/N) of every row-wise output: the double block's image
    and text attention outputs and feed-forwards, each single block's proj_out over text and
    image tokens; and the all-gathers of the adaLN modulations (6 · width for each stream of the
    double block, 3 · width for each single block, a 1/N piece to N − 1 ranks)."""
    layers, inner, text, channels = 3, 32, 16, 16
    image = (height // 16) * (width // 16)
    band = image // ranks
    output = band * channels * 4 * (ranks - 1)
    if strategy == "sync_patch":
        return layers * band * 2 * inner * 4 * (ranks - 1) + output
    if strategy == "ulysses":
        all_to_all = layers * 4 * band * inner * 4 * (ranks - 1) // ranks
        return all_to_all + layers * text * (inner // ranks) * 4 * (ranks - 1) + output
    elements = 2 * image * inner + 2 * text * inner + 2 * (text + image) * inner
    modulation = (2 * 6 * inner + 2 * 3 * inner) // ranks * (ranks - 1) * 4
    return 2 * (ranks - 1) * elements * 4 // ranks + modulation


@pytest.mark.parametrize("strategy", ["sync_patch", "ulysses", "tensor"])
def test_planned_flux_bytes_equal_the_formula(strategy: str) -> None:
    from paraflow.plan import make_plan

    plan = make_plan(compose(["model=tiny_flux_random", f"+strategy={strategy}",
                              "launcher.devices=4", "height=128", "width=96", "steps=2"]))
    want = _flux_bytes_per_step(strategy, 4, 128, 96)
    assert [row.comm_per_step for row in plan.ranks] == [[want] * 2] * 4


def test_tensor_without_a_plan_for_the_family_says_how_to_give_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A family that ships no tensor plan (as an outside family may not) is refused before
    launch, naming the family and the two ways to give a plan."""
    from paraflow.errors import ParaflowError
    from paraflow.families.flux import FluxFamily
    from paraflow.validate import validate

    monkeypatch.setattr(FluxFamily, "tensor_plan", {})
    cfg = compose(["model=tiny_flux_random", "+strategy=tensor", "launcher.devices=2"])
    with pytest.raises(ParaflowError, match=r"no plan for this model's family \(flux\); give "
                                            r"strategy.plan .* or strategy.plans.flux"):
        validate(cfg, None, devices=False)


@pytest.mark.parametrize("model", ["tiny_pixart_random", "tiny_sd3_random", "tiny_flux_random"])
def test_a_band_thinner_than_a_patch_row_is_refused_before_launch(model: str) -> None:
    from paraflow.errors import ParaflowError
    from paraflow.validate import validate

    # 64 px: 8 latent rows, 4 rows of 2×2 patches (Flux: of packed tokens); 5 bands cannot each
    # hold a whole one.
    cfg = compose([f"model={model}", "+strategy=sync_patch", "launcher.devices=5",
                   "height=64"])
    with pytest.raises(ParaflowError, match=r"height=64.*multiple of the model's downsampling "
                                            r"\(2\).*e\.g\. 80"):
        validate(cfg, None, devices=False)


def test_an_unsupported_pipeline_class_is_named(tmp_path: Path) -> None:
    from paraflow.errors import ParaflowError
    from paraflow.models.pretrained import inspect_folder

    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ParaflowError, match="KandinskyPipeline is not supported.*"
                                            "PixArtSigmaPipeline.*FluxPipeline"):
        inspect_folder(str(tmp_path))
