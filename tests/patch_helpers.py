"""Shared helpers of the patch-parallel tests: several runs in ONE launch of gloo ranks (a launch
costs ~10 s of process start-up), and single-device references run in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from safetensors.torch import load_file

from paraflow.api import compose
from paraflow.context import ParallelContext
from paraflow.many import launch_many, prepared
from paraflow.metrics import psnr  # noqa: F401  (the tests' comparison, re-exported)
from paraflow.run import run_on_rank

BASE = ["save_latents=true", "pipeline.progress=false", "launcher.threads_per_rank=1"]


def config(overrides: list[str], out: Path) -> DictConfig:
    return prepared(compose([*BASE, *overrides]), out)


def run_many(cfgs: list[DictConfig]) -> list[dict[str, Any]]:
    """Every config one after another, one launch per rank count; rank 0's records in order."""
    return launch_many(cfgs)


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
