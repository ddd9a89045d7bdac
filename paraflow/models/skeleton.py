"""Pipeline modules on the meta device: every shape and parameter count of the model, no weights
and no memory, from config alone — so layouts can be checked and memory planned before any rank
starts, for models far larger than this machine could hold.

Built-from-config models (tiny, *_arch) run their own builder under `torch.device("meta")`, so
the modules are exactly those a run builds. Pipeline folders (and hub ids already in the local
cache) are read from `<folder>/<component>/config.json`, as `from_pretrained` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from paraflow.config import build_options
from paraflow.families.patched import t5_token_limit
from paraflow.models.components import TEXT_ENCODERS
from paraflow.models.configured import configured_family

# The modules a run holds (a pipeline has a unet or a transformer).
COMPONENTS = ("unet", "transformer", "vae", *TEXT_ENCODERS)


def built_from_config(model_cfg: DictConfig) -> bool:
    return "unet" in model_cfg or "transformer" in model_cfg


def denoiser_component(model_cfg: DictConfig) -> str:
    """The component that denoises: `unet`, or a diffusion transformer's `transformer`."""
    if "transformer" in model_cfg:
        return "transformer"
    folder = None if "unet" in model_cfg else model_folder(model_cfg)
    return "transformer" if folder is not None and (folder / "transformer").is_dir() else "unet"


def model_folder(model_cfg: DictConfig) -> Path | None:
    """The local pipeline folder of a pretrained config (a hub id: its cached snapshot's
    configs, if the cache has them); None when only a download would tell."""
    from paraflow.models.pretrained import looks_like_hub_id

    path = str(model_cfg.get("path", "") or "")
    if not path:
        return None
    if not looks_like_hub_id(path):
        folder = Path(path).expanduser()
        return folder if (folder / "model_index.json").is_file() else None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json"], local_files_only=True))
    except Exception:  # not cached, or no hub client: the caller says what to do instead
        return None


def _from_folder(folder: Path, name: str) -> nn.Module | None:
    config_file = folder / name / "config.json"
    if not config_file.is_file():
        return None
    index = json.loads((folder / "model_index.json").read_text())
    library, class_name = index.get(name, [None, None])
    if library == "transformers":
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder / name)
        with torch.device("meta"):
            module: nn.Module = getattr(transformers, class_name)(config)
        return module
    import diffusers

    config = json.loads(config_file.read_text())
    cls: Any = getattr(diffusers, str(config.get("_class_name", class_name)))
    with torch.device("meta"):
        return cls.from_config(config)  # type: ignore[no-any-return]


def denoiser_skeleton(model_cfg: DictConfig) -> Any:
    """The denoiser's module tree on the meta device (no weights, no memory), from config alone,
    so a layout can be checked before any rank starts. None when only loading would tell (hub ids
    not in the cache, folders without unet/config.json)."""
    return component_skeleton(model_cfg, denoiser_component(model_cfg))


def component_skeleton(model_cfg: DictConfig, name: str) -> nn.Module | None:
    """One pipeline module (`unet`, `vae`, ...) on the meta device; None when the config does
    not tell (hub ids not in the cache, folders without `<name>/config.json`)."""
    if "unet" in model_cfg and name in ("unet", "vae"):
        import diffusers

        cls: Any = diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
        with torch.device("meta"):
            return cls.from_config(OmegaConf.to_container(model_cfg[name], resolve=True))
    if built_from_config(model_cfg):
        return (pipeline_skeleton(model_cfg) or {}).get(name)
    folder = model_folder(model_cfg)
    return None if folder is None else _from_folder(folder, name)


def pipeline_skeleton(model_cfg: DictConfig) -> dict[str, nn.Module] | None:
    """Every module a run holds (COMPONENTS present in the model), on the meta device."""
    if built_from_config(model_cfg):
        from hydra.utils import get_method

        target, options = build_options(model_cfg)
        with torch.device("meta"):
            pipe = get_method(target)(**options)
        return {n: m for n, m in pipe.components.items()
                if n in COMPONENTS and isinstance(m, nn.Module)}
    folder = model_folder(model_cfg)
    if folder is None:
        return None
    found = {n: _from_folder(folder, n) for n in COMPONENTS}
    return {n: m for n, m in found.items() if m is not None}


def prompt_tokens(model_cfg: DictConfig) -> int:
    """Text tokens per prompt the denoiser reads (the cross-attention key length): the
    sequences of the tokenizers its family names, one after another, a T5's up to the
    pipeline's limit (a CLIP tokenizer's length for UNets; T5's for PixArt and Flux; SD3's T5
    and CLIP)."""
    family = configured_family(model_cfg)
    tokenizers = family.prompt_tokenizers() if family is not None else (("tokenizer", False),)
    total = 0
    for name, is_t5 in tokenizers:
        length = _tokenizer_length(model_cfg, name, is_t5=is_t5)
        total += min(t5_token_limit(_pipeline_class(model_cfg)), length) if is_t5 else length
    return total


def _tokenizer_length(model_cfg: DictConfig, name: str, is_t5: bool = False) -> int:
    """A tokenizer's length: a built-from-config model's `max_tokens` (T5's `t5_tokens`, if
    set), a folder's tokenizer config, or CLIP's 77."""
    if built_from_config(model_cfg):
        t5 = model_cfg.get("t5_tokens") if is_t5 else None
        return int(t5 or model_cfg.get("max_tokens", 16))
    folder = model_folder(model_cfg)
    config = None if folder is None else folder / name / "tokenizer_config.json"
    if config is not None and config.is_file():
        return int(json.loads(config.read_text()).get("model_max_length", 77))
    return 77


def _pipeline_class(model_cfg: DictConfig) -> Any:
    """The diffusers pipeline class a model config builds or loads."""
    from paraflow.models.pretrained import SUPPORTED
    from paraflow.models.tiny_dit import PIPELINES

    if built_from_config(model_cfg):
        arch = model_cfg.arch
        return PIPELINES[getattr(arch, "value", arch)]  # DiTArch, or its name
    folder = model_folder(model_cfg)
    index = {} if folder is None else json.loads((folder / "model_index.json").read_text())
    return SUPPORTED.get(str(index.get("_class_name")), PIPELINES["pixart_sigma"])
