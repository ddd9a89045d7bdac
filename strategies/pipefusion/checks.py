"""PipeFusion's pre-launch checks, from the config and the denoiser's skeleton (meta device, no
weights): options in range, a transformer with a block per stage, a patch per token row."""

from __future__ import annotations

from omegaconf import DictConfig

from paraflow.errors import ParaflowError
from paraflow.models.configured import configured_class_name, configured_family
from paraflow.models.skeleton import denoiser_skeleton
from paraflow.validate import model_factor


def check_config(cfg: DictConfig, warmup_steps: int, patches: int | None) -> None:
    if warmup_steps < 1:
        raise ParaflowError(f"strategy.warmup_steps={warmup_steps}: must be at least 1 (the "
                            "first step runs the whole image, filling every layer's keys/values "
                            "that the patches read after it)")
    if patches is not None and patches < 1:
        raise ParaflowError(f"strategy.patches={patches}: must be at least 1, or null for as "
                            "many patches as stages")
    for name, stage in cfg.pipeline.stages.items():
        cache, compile_mode = (str(getattr(v, "value", v)) for v in
                               (stage.get("cache", "none"), stage.get("compile", "none")))
        if cache != "none":
            raise ParaflowError(f"pipeline.stages.{name}.cache={cache}: a step cache does not "
                                "work with strategy pipefusion yet (each stage holds only its "
                                "own blocks); allowed: none")
        if compile_mode != "none" and "denoise" in str(stage.get("_target_", "")):
            raise ParaflowError(f"pipeline.stages.{name}.compile={compile_mode}: compiling the "
                                "denoiser is not built with strategy pipefusion yet; allowed: "
                                "none")


def check_model(cfg: DictConfig, stages: int, patches: int) -> None:
    """A transformer with at least `stages` blocks; at most one patch per token row."""
    family = configured_family(cfg.model)
    skeleton = denoiser_skeleton(cfg.model)
    if family is None or skeleton is None:
        return  # only loading the model tells: parallelize checks the blocks
    blocks = len(family.cache_blocks(skeleton))
    denoiser = configured_class_name(cfg.model)
    if blocks == 0:
        raise ParaflowError(
            f"strategy pipefusion splits a transformer's sequence of blocks into pipeline "
            f"stages, but the denoiser of model {cfg.model.get('name', '')} ({denoiser}) is a "
            "UNet: its down and up blocks are joined by skip connections, so they do not form "
            "one sequence to cut into stages. Use a patch strategy (sync_patch, "
            "displaced_patch), ulysses or tensor for a UNet")
    if stages > blocks:
        raise ParaflowError(
            f"strategy pipefusion: {stages} stages (ranks per image) but {denoiser} has "
            f"{blocks} transformer blocks; at most {blocks} stages: use fewer ranks "
            "(launcher.devices), or give the rest to strategy.data_degree or cfg_split")
    unit = family.downsampling(skeleton.config)
    rows = int(cfg.height) // model_factor(cfg.model)
    if rows % unit:
        raise ParaflowError(f"height={cfg.height}: {rows} latent rows are not whole token rows "
                            f"of {unit} latent rows")
    if patches > rows // unit:
        raise ParaflowError(
            f"strategy.patches={patches}: height={cfg.height} has {rows // unit} token rows "
            f"and a patch is at least one; allowed: 1 to {rows // unit} (null: one per stage)")
