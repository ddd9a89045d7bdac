"""LoRA adapters as part of the model config: `model.lora=[{path: DIR, scale: 0.8}, ...]`,
loaded by diffusers' own LoRA loading (peft layers around the targeted modules), every adapter
active at its scale; `model.lora_fuse=true` merges them into the weights and drops the peft
layers (plain modules again: what tensor parallelism shards).

The denoiser's layers of a file are loaded; its text-encoder layers are skipped with a warning
(transformers 5 loads them only with peft >= 0.22, newer than this platform's registry has).

Before launch, each file's denoiser layers are matched against the model's, built on the meta
device: a layer the model lacks or of another width is refused, naming both."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
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


def lora_entries(model_cfg: DictConfig) -> list[Any]:
    return list(model_cfg.get("lora") or [])


def weights_file(entry: Any, index: int) -> Path:
    """The safetensors file of model.lora[index]: a folder's pytorch_lora_weights.safetensors
    (or its only .safetensors file), or the file itself."""
    path = Path(str(entry.path)).expanduser()
    where = f"model.lora[{index}].path={entry.path}"
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
    """Pre-launch: every model.lora entry has a readable file, and its denoiser layers exist
    in the model at the widths they adapt (the schema has checked that scale is a number)."""
    from paraflow.models.skeleton import denoiser_skeleton

    entries = lora_entries(model_cfg)
    if not entries:
        return
    from paraflow.families.registry import families
    from paraflow.models.configured import configured_family

    family = configured_family(model_cfg)
    if family is not None and not family.takes_lora:
        takers = sorted(f.name for f in families().values() if f.takes_lora)
        raise ParaflowError(f"model.lora: model {model_cfg.name} is a {family.name} model, "
                            f"whose diffusers pipeline loads no LoRA; families that do: "
                            f"{', '.join(takers)}")
    skeleton = denoiser_skeleton(model_cfg)
    modules = dict(skeleton.named_modules()) if skeleton is not None else None
    for index, entry in enumerate(entries):
        file = weights_file(entry, index)
        try:
            layers = list(denoiser_layers(file))
        except Exception as error:  # safetensors raises its own kinds for a damaged header
            raise ParaflowError(f"model.lora[{index}]: {file} is not a readable safetensors "
                                f"file ({error})") from None
        if modules is not None:
            for name, part, shape in layers:
                _check_layer(index, file, modules, name, part, shape)


def _check_layer(index: int, file: Path, modules: dict[str, nn.Module], name: str, part: str,
                 shape: list[int]) -> None:
    where = f"model.lora[{index}] ({file.name})"
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
    lora1, ...), each at its scale; fused into the weights when model.lora_fuse."""
    entries = lora_entries(model_cfg)
    if not entries:
        return pipe
    if not hasattr(pipe, "load_lora_weights"):
        raise ParaflowError(f"model.lora: {type(pipe).__name__} takes no LoRA adapters")
    names = [f"lora{i}" for i in range(len(entries))]
    for index, (name, entry) in enumerate(zip(names, entries)):
        file = weights_file(entry, index)
        weights = load_file(str(file))
        mine = {k: v for k, v in weights.items() if k.partition(".")[0] in DENOISERS}
        if len(mine) < len(weights):
            log.warning("model.lora[%d] (%s): %d text-encoder tensors skipped; only the "
                        "denoiser's layers are applied", index, file, len(weights) - len(mine))
        if not mine:
            raise ParaflowError(f"model.lora[{index}] ({file}): no denoiser layers in it")
        pipe.load_lora_weights(mine, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[float(e.get("scale", 1.0)) for e in entries])
    if model_cfg.get("lora_fuse"):
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()  # the merged weights stay; the peft layers go
    return pipe
