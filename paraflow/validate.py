"""Checks on a composed config, run before any rank starts, each naming the bad value."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from paraflow.attention import check_backend
from paraflow.cache import check_cache
from paraflow.compile import any_stage_compiles, check_compile
from paraflow.errors import ParaflowError
from paraflow.graph import execution_order, input_binding
from paraflow.models.configured import (
    configured_denoiser,
    configured_downsampling,
    configured_family,
    configured_latent_downsampling,
)
from paraflow.models.lora import check_choice, check_loras
from paraflow.outputs import check_output_dir
from paraflow.plugin import Strategy
from paraflow.registry import build_strategy
from paraflow.sizes import with_binned_size


def prompts_of(cfg: DictConfig) -> list[str]:
    prompt = cfg.prompt
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ParaflowError(f"prompt={prompt!r}: give a string or a non-empty list of strings")
    return prompts


def model_factor(model_cfg: DictConfig) -> int:
    """Pixels per latent cell (the VAE's downsampling), read from config, no weights loaded."""
    return configured_latent_downsampling(model_cfg)


def check_stage_inputs(cfg: DictConfig, accelerator: str | None = None) -> None:
    """Each stage class's own pre-launch check, `check(cfg, spec)` where it has one (an input
    image that must exist, a strength in range); a `_target_` that does not import is named."""
    read: set[str] = set()
    for name, spec in cfg.pipeline.stages.items():
        try:
            found = get_class(spec._target_)
        except Exception as error:  # Hydra wraps import failures of every kind
            raise ParaflowError(f"pipeline.stages.{name}._target_={spec._target_}: cannot "
                                f"import it ({error})") from None
        check_wiring(name, found, spec)
        model = (spec.get("options") or {}).get("model")
        models = sorted(cfg.pipeline.get("models") or {})
        if model is not None and model not in models:
            raise ParaflowError(f"pipeline.stages.{name}: options.model={model}, but the "
                                f"pipeline's models are {', '.join(models) or 'none'} "
                                "(pipeline.models)")
        read |= run_keys_read(found, spec)
        model_cfg = cfg.pipeline.models[model] if model is not None else cfg.model
        check_cache(name, spec, found, configured_family(model_cfg))
        check_compile(name, spec, found, accelerator)
        check = getattr(found, "check", None)
        if check is not None:
            check(cfg, spec)
    check_unread_keys(cfg, read)


# Run keys that only some pipelines read, and which pipelines do (for the message).
SOME_PIPELINES = {"image": "img2img, inpaint", "mask": "inpaint", "strength": "img2img, inpaint",
                  "denoising_end": "sdxl_refine"}


def run_keys_read(stage_class: type, spec: DictConfig) -> set[str]:
    """The SOME_PIPELINES keys a stage reads: those its class names in `run_keys`, strength
    where its options hold a default strength, denoising_end where they hold a hand-over."""
    keys = set(getattr(stage_class, "run_keys", ()))
    options = set(spec.get("options") or {})
    if "strength" in options:
        keys.add("strength")
    if options & {"denoising_end", "denoising_start"}:
        keys.add("denoising_end")
    return keys


def check_unread_keys(cfg: DictConfig, read: set[str]) -> None:
    """A key given to a pipeline that does not read it is refused, not silently ignored."""
    for key, pipelines in SOME_PIPELINES.items():
        if cfg.get(key) is not None and key not in read:
            raise ParaflowError(f"{key}={cfg[key]}: pipeline={cfg.pipeline.name} does not read "
                                f"it (pipeline={pipelines} do)")
    end = cfg.get("denoising_end")
    if end is not None and not 0 < float(end) < 1:
        raise ParaflowError(f"denoising_end={end}: must be in (0, 1), the fraction of the "
                            "schedule the base runs")


def check_wiring(name: str, stage_class: type, spec: DictConfig) -> None:
    """The stage's inputs bind to parameters its __call__ takes, and every parameter without a
    default is bound."""
    params = list(inspect.signature(stage_class.__call__).parameters.values())[2:]  # self, env
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params]
    bound = [input_binding(entry) for entry in spec.inputs]
    where = f"pipeline.stages.{name} ({spec._target_})"
    for value, parameter in bound:
        if parameter not in takes:
            raise ParaflowError(f"{where}: input '{parameter}' is not a parameter of the stage, "
                                f"which takes {', '.join(takes)}; pass a value under another "
                                f"name as '{value} as PARAMETER'")
    given = {parameter for _, parameter in bound}
    missing = [p.name for p in params if p.default is p.empty and p.name not in given]
    if missing:
        raise ParaflowError(f"{where}: inputs lack {', '.join(missing)}, which the stage needs")


def resolve_accelerator(cfg: DictConfig) -> str:
    wanted = str(getattr(cfg.launcher.accelerator, "value", cfg.launcher.accelerator))
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ParaflowError("launcher.accelerator=cuda but no CUDA device is visible; "
                            "use launcher.accelerator=cpu or auto")
    return wanted


def validate(cfg: DictConfig, output_dir: str | Path | None, devices: bool = True) -> Strategy:
    """Every check a run makes before launching; the strategy it built to check (a caller on a
    rank keeps it rather than building another). `devices=False` (planning, paraflow/plan):
    skip the checks against this machine's accelerators, since the plan is for another. The
    size checked is the size generated at (resolution binning, paraflow/sizes.py)."""
    cfg = with_binned_size(cfg)
    prompts_of(cfg)
    for key in ("steps", "images_per_prompt"):
        if int(cfg[key]) < 1:
            raise ParaflowError(f"{key}={cfg[key]}: must be at least 1")
    if float(cfg.guidance_scale) < 0:
        raise ParaflowError(f"guidance_scale={cfg.guidance_scale}: must be >= 0 "
                            "(values <= 1 turn classifier-free guidance off)")
    factor = model_factor(cfg.model)
    check_loras(cfg.model)
    check_choice(cfg)
    for name, other in (cfg.pipeline.get("models") or {}).items():
        check_loras(other)
        if model_factor(other) != factor:  # one latent tensor goes from one model to the next
            raise ParaflowError(f"pipeline.models.{name} ({other.name}): its VAE downsamples "
                                f"by {model_factor(other)}, model {cfg.model.name}'s by {factor}")
    family = configured_family(cfg.model)  # e.g. a transformer reads whole tokens
    if family is not None:
        factor *= family.size_unit(configured_denoiser(cfg.model))
    for key in ("height", "width"):
        value = int(cfg[key])
        if value <= 0 or value % factor:
            nearest = max(factor, value // factor * factor)
            raise ParaflowError(f"{key}={value}: must be a positive multiple of {factor} for "
                                f"model {cfg.model.name} (e.g. {nearest})")
    launcher = cfg.launcher
    for key in ("devices", "num_nodes"):
        if int(launcher[key]) < 1:
            raise ParaflowError(f"launcher.{key}={launcher[key]}: must be at least 1")
    if launcher.threads_per_rank is not None and int(launcher.threads_per_rank) < 1:
        raise ParaflowError(f"launcher.threads_per_rank={launcher.threads_per_rank}: must be >= 1")
    if float(launcher.timeout_s) <= 0:
        raise ParaflowError(f"launcher.timeout_s={launcher.timeout_s}: must be > 0")
    if int(cfg.pipeline.max_batch) < 1:
        raise ParaflowError(f"pipeline.max_batch={cfg.pipeline.max_batch}: must be at least 1")
    if devices and resolve_accelerator(cfg) == "cuda" and \
            launcher.devices > torch.cuda.device_count():
        raise ParaflowError(f"launcher.devices={launcher.devices} but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s); "
                            f"use 1..{torch.cuda.device_count()}")
    strategy = build_strategy(cfg.strategy)
    strategy.validate(cfg)  # the strategy's own pre-launch checks
    if strategy.replicated_latents:  # bands are cut by the run's model's coarsest level
        unit = configured_downsampling(cfg.model)
        for name, other in (cfg.pipeline.get("models") or {}).items():
            if configured_downsampling(other) not in (None, unit):
                raise ParaflowError(f"pipeline.models.{name} ({other.name}): its denoiser "
                                    f"downsamples by {configured_downsampling(other)}, model "
                                    f"{cfg.model.name}'s by {unit}; strategy {strategy.name} "
                                    "cuts one band plan for both")
    execution_order(cfg.pipeline.stages)
    check_stage_inputs(cfg, resolve_accelerator(cfg) if devices else None)
    check_backend(str(cfg.attention.backend), resolve_accelerator(cfg) if devices else None)
    if any_stage_compiles(cfg.pipeline.stages) and launcher.link.bandwidth_gb_s is not None:
        raise ParaflowError(f"launcher.link.bandwidth_gb_s={launcher.link.bandwidth_gb_s}: a "
                            "modeled link sleeps on the host, which a compiled stage cannot; "
                            "set it to null or the stages' compile to none")
    world = int(launcher.devices) * int(launcher.num_nodes)
    for name, spec in cfg.pipeline.stages.items():
        parallel = str(getattr(spec.get("parallel", "none"), "value", spec.get("parallel", "none")))
        if parallel == "patch" and world > 1 and not strategy.replicated_latents:
            raise ParaflowError(f"pipeline.stages.{name}.parallel=patch needs every rank to hold "
                                f"the same image, which strategy {strategy.name} does not: use a "
                                "patch strategy (+strategy=sync_patch, displaced_patch, "
                                "distrifusion, naive_patch) or parallel=none")
    if output_dir is not None:
        check_output_dir(output_dir)
    return strategy
