"""LoRA adapters as part of the model config: `model.lora=[{path: DIR, scale: 0.8}, ...]`,
loaded by diffusers' own LoRA loading (peft layers around the targeted modules), every adapter
active at its scale; `model.lora_fuse=true` merges them into the weights and drops the peft
layers (plain modules again: what tensor parallelism shards).

`model.adapters=[{name: ink, path: DIR}, ...]` are loaded too, unfused and off: a generation
turns some on by name with the run key `lora=[{name: ink, scale: 0.8}]` (set_adapters switches
them; nothing is reloaded), so one model serves many adapters (a service's per-request LoRA).

The denoiser's layers of a file are loaded; its text-encoder layers are skipped with a warning
(transformers 5 loads them only with peft >= 0.22, newer than this platform's registry has).

Before launch, each file's denoiser layers are matched against the model's, built on the meta
device: a layer the model lacks or of another width is refused, naming both."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from paraflow.errors import ParaflowError

log = logging.getLogger(__name__)

WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
DENOISERS = ("unet", "transformer")
# The down (reads the layer's inputs) and up (writes its outputs) factors of a layer, in keys
# {component}.{module}{suffix}: peft's format and diffusers' own. Other formats (kohya's) are
# converted by diffusers at load time and not checked before launch.
DOWN, UP = "down", "up"
SUFFIXES = {".lora_A.weight": DOWN, ".lora.down.weight": DOWN,
            ".lora_B.weight": UP, ".lora.up.weight": UP}


NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")  # a peft adapter name (no dots)
FIXED = re.compile(r"^lora\d+$")  # the names model.lora's adapters get (lora0, lora1, ...)


def lora_entries(model_cfg: DictConfig) -> list[Any]:
    return list(model_cfg.get("lora") or [])


def adapter_entries(model_cfg: DictConfig) -> list[Any]:
    return list(model_cfg.get("adapters") or [])


def unfused_entries(model_cfg: DictConfig) -> list[Any]:
    """Every adapter that stays a peft layer (what tensor parallelism cannot shard)."""
    fixed = [] if model_cfg.get("lora_fuse") else lora_entries(model_cfg)
    return fixed + adapter_entries(model_cfg)


def weights_file(entry: Any, key: str) -> Path:
    """The safetensors file of the entry `key` ("model.lora[0]"): a folder's
    pytorch_lora_weights.safetensors (or its only .safetensors file), or the file itself."""
    path = Path(str(entry.path)).expanduser()
    where = f"{key}.path={entry.path}"
    if path.is_file():
        return path
    if not path.is_dir():
        raise ParaflowError(f"{where}: no such file or folder")
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise ParaflowError(f"{where}: holds no {WEIGHTS} (and {len(found)} other .safetensors "
                            "files); give the file itself")
    return found[0]


def denoiser_layers(file: Path) -> Iterator[tuple[str, str, list[int]]]:
    """(module name in the denoiser, DOWN or UP, weight shape) of every denoiser layer of a
    peft-format LoRA file, read from its header (no weights loaded)."""
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():
            component, _, rest = key.partition(".")
            if component not in DENOISERS:
                continue
            for suffix, part in SUFFIXES.items():
                if rest.endswith(suffix):
                    yield rest[:-len(suffix)], part, list(handle.get_slice(key).get_shape())


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a layer LoRA can adapt; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def check_loras(model_cfg: DictConfig) -> None:
    """Pre-launch: every model.lora and model.adapters entry has a readable file, and its
    denoiser layers exist in the model at the widths they adapt (the schema has checked that
    scale is a number); adapter names are unique peft names."""
    from paraflow.models.skeleton import denoiser_skeleton

    entries = [(f"model.lora[{i}]", e) for i, e in enumerate(lora_entries(model_cfg))]
    entries += [(f"model.adapters[{i}]", e) for i, e in enumerate(adapter_entries(model_cfg))]
    if not entries:
        return
    passed = (OmegaConf.to_yaml(model_cfg), *(_stamp(entry) for _, entry in entries))
    if passed in _PASSED:  # a service checks every request's config: the model's is the same
        return
    from paraflow.families.registry import families
    from paraflow.models.configured import configured_family

    family = configured_family(model_cfg)
    if family is not None and not family.takes_lora:
        takers = sorted(f.name for f in families().values() if f.takes_lora)
        raise ParaflowError(f"{entries[0][0]}: model {model_cfg.name} is a {family.name} model, "
                            f"whose diffusers pipeline loads no LoRA; families that do: "
                            f"{', '.join(takers)}")
    _check_names(adapter_entries(model_cfg))
    skeleton = denoiser_skeleton(model_cfg)
    modules = dict(skeleton.named_modules()) if skeleton is not None else None
    for key, entry in entries:
        file = weights_file(entry, key)
        try:
            layers = list(denoiser_layers(file))
        except Exception as error:  # safetensors raises its own kinds for a damaged header
            raise ParaflowError(f"{key}: {file} is not a readable safetensors "
                                f"file ({error})") from None
        if modules is not None:
            for name, part, shape in layers:
                _check_layer(key, file, modules, name, part, shape)
    _PASSED.add(passed)


_PASSED: set[tuple[str, ...]] = set()  # model configs checked, with their files' stamps


def _stamp(entry: Any) -> str:
    """A LoRA's path and its files' modification times: a changed LoRA is checked again."""
    path = Path(str(entry.path)).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    try:
        return f"{path}@" + ",".join(str(f.stat().st_mtime_ns) for f in files)
    except OSError:
        return f"{path}@missing"


def _check_names(adapters: list[Any]) -> None:
    seen: set[str] = set()
    for index, entry in enumerate(adapters):
        name, key = str(entry.name), f"model.adapters[{index}].name={entry.name}"
        if not NAME.match(name) or FIXED.match(name):
            raise ParaflowError(f"{key}: a name of letters, digits, '_' and '-' (at most 64, "
                                "not starting with a digit or '-', and not lora0, lora1, ...: "
                                "model.lora's adapters are named so)")
        if name in seen:
            raise ParaflowError(f"{key}: given twice; each adapter needs its own name")
        seen.add(name)


def check_choice(cfg: DictConfig) -> None:
    """Pre-launch: the run key `lora` names adapters of model.adapters, each once."""
    known = [str(e.name) for e in adapter_entries(cfg.model)]
    chosen = [str(c.name) for c in cfg.get("lora") or []]
    for index, name in enumerate(chosen):
        if name not in known:
            raise ParaflowError(f"lora[{index}].name={name}: not one of model.adapters "
                                f"({', '.join(known) or 'none are loaded'})")
        if name in chosen[:index]:
            raise ParaflowError(f"lora[{index}].name={name}: chosen twice")


def _check_layer(key: str, file: Path, modules: dict[str, nn.Module], name: str, part: str,
                 shape: list[int]) -> None:
    where = f"{key} ({file.name})"
    widths = _widths(modules[name]) if name in modules else None
    if widths is None:
        raise ParaflowError(f"{where}: adapts layer '{name}', which this model's denoiser does "
                            "not have (a LoRA made for another model?)")
    # The down factor reads the layer's inputs (shape[1]); the up one writes its outputs.
    wanted, got = (widths[0], shape[1]) if part == DOWN else (widths[1], shape[0])
    if wanted != got:
        side = "inputs" if part == DOWN else "outputs"
        raise ParaflowError(f"{where}: layer '{name}' has {wanted} {side} in this model, the "
                            f"LoRA adapts {got} (a LoRA made for another model?)")


def apply_loras(pipe: Any, model_cfg: DictConfig) -> Any:
    """Load every model.lora entry into `pipe` (diffusers' load_lora_weights, adapters lora0,
    lora1, ...), each at its scale, fused into the weights when model.lora_fuse; then every
    model.adapters entry under its name, off."""
    entries = lora_entries(model_cfg)
    adapters = adapter_entries(model_cfg)
    if not entries and not adapters:
        return pipe
    if not hasattr(pipe, "load_lora_weights"):
        raise ParaflowError(f"model.lora: {type(pipe).__name__} takes no LoRA adapters")
    names = [f"lora{i}" for i in range(len(entries))]
    for index, (name, entry) in enumerate(zip(names, entries)):
        _load(pipe, name, weights_file(entry, f"model.lora[{index}]"))
    if entries and model_cfg.get("lora_fuse"):
        pipe.set_adapters(names, adapter_weights=[float(e.get("scale", 1.0)) for e in entries])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()  # the merged weights stay; the peft layers go
    for index, entry in enumerate(adapters):  # after the fusing: unload_lora_weights drops all
        _load(pipe, str(entry.name), weights_file(entry, f"model.adapters[{index}]"))
    activate_adapters(pipe, model_cfg, [])
    return pipe


def _load(pipe: Any, name: str, file: Path) -> None:
    weights = load_file(str(file))
    mine = {k: v for k, v in weights.items() if k.partition(".")[0] in DENOISERS}
    if len(mine) < len(weights):
        log.warning("LoRA %s (%s): %d text-encoder tensors skipped; only the denoiser's layers "
                    "are applied", name, file, len(weights) - len(mine))
    if not mine:
        raise ParaflowError(f"LoRA {name} ({file}): no denoiser layers in it")
    pipe.load_lora_weights(mine, adapter_name=name)


def activate_adapters(pipe: Any, model_cfg: DictConfig, chosen: Any) -> None:
    """Switch `pipe`'s adapters to model.lora's unfused ones and `chosen` (the run key `lora`:
    names of model.adapters with scales), every other one off. A no-op for a model without
    unfused adapters (and for the planner's meta skeleton, which loads none)."""
    if not unfused_entries(model_cfg) or not hasattr(pipe, "set_adapters"):
        return
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if not getattr(denoiser, "peft_config", None):
        return
    fixed = [] if model_cfg.get("lora_fuse") else lora_entries(model_cfg)
    names = [f"lora{i}" for i in range(len(fixed))] + [str(c.name) for c in chosen]
    scales = [float(e.get("scale", 1.0)) for e in fixed] + [float(c.scale) for c in chosen]
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=scales)
    else:
        pipe.disable_lora()
