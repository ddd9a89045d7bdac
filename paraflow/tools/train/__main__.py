"""`python -m paraflow.tools.train`: train the embedded default model (see conf/train.yaml)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from paraflow.tools.shapes import VOCABULARY


def build_untrained(cfg: DictConfig) -> Any:
    from paraflow.models.tiny import build_tiny

    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    return build_tiny("sd", model["unet"], model["vae"], model["text_encoder"],
                      init_seed=cfg.seed, max_tokens=model["max_tokens"], vocabulary=VOCABULARY)


def export(pipe: Any, folder: Path) -> None:
    """A stock diffusers pipeline folder, weights in fp16 safetensors (loaders upcast)."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    pipe.to(torch.float32)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def draw_samples(folder: Path, count: int, seed: int, out: Path) -> None:
    """Sample a grid with stock diffusers from the exported folder: the shipped artefact."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from paraflow.tools.shapes import random_scenes

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = random_scenes(seed + 2, count)
    images = pipe([s.caption for s in scenes], num_inference_steps=25, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed), height=64, width=64).images
    side = images[0].width
    columns = min(count, 8)
    grid = Image.new("RGB", (side * columns, side * ((count + columns - 1) // columns)))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * side, (i // columns) * side))
    grid.save(out / "samples.png")
    (out / "samples.txt").write_text("\n".join(s.caption for s in scenes) + "\n")


@hydra.main(config_path="pkg://paraflow.conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from paraflow.tools.train.phases import train_unet, train_vae

    torch.set_num_threads(cfg.threads)
    out = Path(HydraConfig.get().runtime.output_dir)
    state: dict[str, Any] = torch.load(cfg.resume, weights_only=False) if cfg.resume else {}
    pipe = build_untrained(cfg)
    if "vae" in state:
        pipe.vae.load_state_dict(state["vae"])
    if state.get("phase") != "unet":
        train_vae(pipe, cfg, out, state)
    pipe.vae.eval().requires_grad_(False)
    averaged = train_unet(pipe, cfg, out, state)
    if averaged is None:
        print(f"stopped at step {cfg.stop_after}; resume=" + str(out / "checkpoint.pt"))
        return
    pipe.unet, pipe.text_encoder = averaged["unet"], averaged["text_encoder"]
    export(pipe, out / "pipeline")
    if cfg.export_to:
        export(pipe, Path(cfg.export_to))
    if cfg.samples:
        draw_samples(out / "pipeline", cfg.samples, cfg.seed, out)
    print(f"pipeline written to {out / 'pipeline'}")


if __name__ == "__main__":
    main()
