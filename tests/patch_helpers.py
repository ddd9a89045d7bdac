"""Shared helpers of the patch-parallel tests: several runs on the session's kept gloo ranks (a
launch costs ~10 s of process start-up; tests/pools.py), and single-device references run
in-process."""

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
from tests.pools import POOLS

BASE = ["save_latents=true", "pipeline.progress=false", "launcher.threads_per_rank=1"]


def config(overrides: list[str], out: Path) -> DictConfig:
    return prepared(compose([*BASE, *overrides]), out)


def run_many(cfgs: list[DictConfig]) -> list[dict[str, Any]]:
    """Every config one after another on the session's kept ranks; rank 0's records in order."""
    return launch_many(cfgs, pools=POOLS)


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


Cases = dict[str, tuple[list[str], list[str]]]  # name → (reference, extra parallel overrides)


def run_against_one_device(cases: Cases, devices: int, tmp: Path
                           ) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every case on `devices` ranks (the session's kept ranks) and its reference on one device
    in-process, each distinct reference run once: name → (parallel record, reference record)."""
    distinct: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, (ref, _) in cases.items():
        if tuple(ref) not in distinct:
            distinct[tuple(ref)] = run_single(config(ref, tmp / f"{name}_ref"))
    refs = {name: distinct[tuple(ref)] for name, (ref, _) in cases.items()}
    cfgs = [config([*ref, *extra, f"launcher.devices={devices}"], tmp / name)
            for name, (ref, extra) in cases.items()]
    return dict(zip(cases, zip(run_many(cfgs), refs.values())))


def check_exact(run: dict[str, Any], ref: dict[str, Any], tol: float = 1e-4) -> None:
    """Final fp32 latents within `tol` max abs difference, every image within 1 grey level."""
    got, want = latents(run), latents(ref)
    assert got.shape == want.shape
    diff = float((got - want).abs().max())
    print(f"max |latents - single| = {diff:.2e}")
    assert diff <= tol
    for index in range(len(ref["images"])):
        assert float((image(run, index) - image(ref, index)).abs().max()) <= 1.0
