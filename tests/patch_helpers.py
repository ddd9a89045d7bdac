"""Shared helpers of the patch-parallel tests: several runs in ONE launch of gloo ranks (a launch
costs ~10 s of process start-up), and single-device references run in-process."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from safetensors.torch import load_file

from paraflow.api import compose
from paraflow.context import ParallelContext
from paraflow.launcher import launch
from paraflow.run import run_each_on_rank, run_on_rank
from paraflow.validate import validate

BASE = ["save_latents=true", "pipeline.progress=false", "launcher.threads_per_rank=1"]


def config(overrides: list[str], out: Path) -> DictConfig:
    cfg = compose([*BASE, *overrides])
    validate(cfg, out)
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def run_many(cfgs: list[DictConfig]) -> list[dict[str, Any]]:
    """Run every config (same launcher.devices) one after another in one launch; rank 0's
    records, in order."""
    runs = [OmegaConf.to_container(c, resolve=True, enum_to_str=True) for c in cfgs]
    devices = {int(c.launcher.devices) for c in cfgs}
    if len(devices) != 1:
        raise ValueError(f"one launch needs one world size, got {devices}")
    result = launch(cfgs[0], functools.partial(run_each_on_rank, runs=runs))
    assert result is not None
    return list(result)


def run_single(cfg: DictConfig) -> dict[str, Any]:
    """A one-device run in this process (no spawn)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_on_rank(ParallelContext.single(), cfg)
    finally:
        torch.set_num_threads(threads)
    assert result is not None
    return result


def latents(record: dict[str, Any]) -> torch.Tensor:
    return load_file(str(Path(record["output_dir"]) / "latents.safetensors"))["latents"]


def image(record: dict[str, Any], index: int = 0) -> torch.Tensor:
    path = Path(record["output_dir"]) / record["images"][index]
    return torch.from_numpy(np.array(Image.open(path))).float()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float | None = None) -> float:
    """PSNR of `a` against reference `b`; peak: 255 for images, else the reference's range."""
    peak = float(b.max() - b.min()) if peak is None else peak
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
