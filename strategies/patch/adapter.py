"""The diffusers names patch parallelism touches, in one place: the UNet's downsampling factor,
its self-attention modules and processors, and the arguments and output of a UNet call."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unet_downsampling(unet: Any) -> int:
    """Rows of latent per row at the UNet's coarsest level (2 per down block but the last)."""
    return int(2 ** (len(unet.config.block_out_channels) - 1))


def configured_downsampling(model_cfg: Any) -> int | None:
    """The UNet's downsampling read from a model config (no weights), None if unknown."""
    if "unet" in model_cfg:
        return int(2 ** (len(model_cfg.unet.block_out_channels) - 1))
    path = Path(str(model_cfg.get("path", ""))).expanduser() / "unet" / "config.json"
    if path.is_file():
        return int(2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1))
    return None


def replicated_input_convs(unet: Any) -> set[str]:
    """The convolutions of `unet` whose input every rank holds whole: `conv_in` reads the
    latent itself (unless the UNet rescales it first), so its halo rows can be sliced from the
    current latent instead of exchanged or taken from the previous step."""
    conv_in = getattr(unet, "conv_in", None)
    if isinstance(conv_in, nn.Conv2d) and not unet.config.get("center_input_sample", False):
        return {"conv_in"}
    return set()


def set_self_attention_processors(model: nn.Module, make: Callable[[str], Any]) -> int:
    """Give every self-attention module of `model` the processor `make(name)`; cross-attention
    keeps its own. Returns how many were set."""
    count = 0
    for name, module in model.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "to_k"):
            if not getattr(module, "is_cross_attention", False):
                module.set_processor(make(name))
                count += 1
    return count


def _select_batch(value: Any, batch: int, rows: slice) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _select_batch(v, batch, rows) for k, v in value.items()}
    return value


def split_unet_call(args: tuple[Any, ...], kwargs: dict[str, Any], batch_rows: slice,
                    band_rows: slice) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """A UNet call's arguments for one batch slice and one band of rows; also the full sample."""
    sample = args[0] if args else kwargs["sample"]
    batch = sample.shape[0]
    new_args = tuple(_select_batch(a, batch, batch_rows) for a in args)
    new_kwargs = {k: _select_batch(v, batch, batch_rows) for k, v in kwargs.items()}
    band = sample[batch_rows, :, band_rows, :]
    if args:
        new_args = (band, *new_args[1:])
    else:
        new_kwargs["sample"] = band
    return new_args, new_kwargs, sample


def unet_output_sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def with_output_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output
