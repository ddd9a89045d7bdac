"""Shared fixtures: composing configs, running paraflow in-process or as the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from paraflow.api import compose, generate
from tests.pools import POOLS

REPO = Path(__file__).resolve().parent.parent
FAST = ["steps=3", "pipeline.progress=false"]


def run_paraflow(out_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Compose `overrides` (plus the fast defaults) and run: in-process, or on the session's
    kept ranks (tests/pools.py)."""
    cfg = compose([*FAST, *overrides])
    pooled = int(cfg.launcher.devices) > 1 and int(cfg.launcher.num_nodes) == 1
    return generate(cfg, out_dir, ranks=POOLS.of(int(cfg.launcher.devices)) if pooled else None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    POOLS.close()  # the kept ranks leave with the session


def run_cli(args: Sequence[str], env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "paraflow", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


def install_outside(package: str, root: Path) -> Path:
    """Install tests/PACKAGE (an outside plugin) with pip into ROOT/site, built from a copy so
    builds stay out of the repository; the folder to put on PYTHONPATH."""
    shutil.copytree(REPO / "tests" / package, root / "src")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(root / "site"), str(root / "src")],
                   check=True, capture_output=True, timeout=300)
    return root / "site"


def read_images(out_dir: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((out_dir / "images").glob("*.png"))]


def read_latents(out_dir: Path) -> Any:
    return load_file(str(out_dir / "latents.safetensors"))["latents"]


def one_device_run(tmp_path: Path, name: str, steps: int, overrides: list[str]
                   ) -> dict[str, Any]:
    """A run on one device (in this process): its latents, first image, and rank 0's denoiser
    calls, reused steps and compilation from run.json."""
    from paraflow.api import compose, generate

    out = tmp_path / name
    generate(compose([f"steps={steps}", "save_latents=true", "pipeline.progress=false",
                      "launcher.threads_per_rank=1", *overrides]), out)
    record = json.loads((out / "run.json").read_text())
    return {"latents": read_latents(out), "image": read_images(out)[0],
            "calls": record["denoiser_calls"][0], "reused": record["reused_steps"][0],
            "compile": record["compile"][0]}


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD and SDXL models written with diffusers' save_pretrained (safetensors)."""
    from paraflow.models import load_pipeline

    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name in ("tiny_random", "tiny_xl_random"):
        pipe = load_pipeline(compose([f"model={name}"]).model)
        pipe.save_pretrained(root / name, safe_serialization=True)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random LoRAs of the tiny model, by the names the service tests give them: one on
    the attention layers, one on the resnets' 3×3 convolutions."""
    from paraflow.models import load_pipeline
    from paraflow.tools.random_lora import save_random_lora

    root = tmp_path_factory.mktemp("adapters")
    return {"ink": save_random_lora(load_pipeline(compose(["model=tiny_random"]).model),
                                    root / "ink"),
            "sky": save_random_lora(load_pipeline(compose(["model=tiny_random"]).model),
                                    root / "sky", targets=["conv1", "conv2"], seed=1)}
