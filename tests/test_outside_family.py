"""A model family from another package (tests/outside_family: AuraFlow's transformer, which
paraflow itself does not know, never named in paraflow/): installed with pip into a scratch
folder, found through the entry-point groups `paraflow.families` and `paraflow.configs`.

One device equals the stock AuraFlowPipeline on the same components (the same code path:
within 1e-5 on the final latents); data ×2 equals one device within 1e-4 (a batch of 1 against
a batch of 2: other CPU kernels); sync_patch ×2 within 1e-5, while naive_patch ×2 (bands that
attend only to themselves) is at least 1e-4 off, so the check can fail. Every run is a subprocess
with the scratch folder on PYTHONPATH (nothing is installed into the test's environment): the
one-device run through the CLI, the three 2-rank runs in one launch (paraflow.many)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, install_outside

pytestmark = pytest.mark.slow
PROMPTS = "prompt=[a red circle,a blue square]"
RUN = ["model=tiny_auraflow_random", "height=96", "width=64", "steps=4", PROMPTS,
       "save_latents=true", "pipeline.progress=false", "launcher.threads_per_rank=1"]
STOCK = """
import json, sys, torch
from safetensors.torch import save_file
from paraflow_auraflow.model import UMT5, TRANSFORMER, VAE, build_tiny_auraflow
torch.set_num_threads(1)
cfg = json.load(open(sys.argv[1]))["config"]
pipe = build_tiny_auraflow(TRANSFORMER, VAE, UMT5)
pipe.set_progress_bar_config(disable=True)
latents = pipe(prompt=list(cfg["prompt"]), height=cfg["height"], width=cfg["width"],
               num_inference_steps=cfg["steps"], guidance_scale=cfg["guidance_scale"],
               generator=[torch.Generator().manual_seed(cfg["seed"] + i) for i in range(2)],
               max_sequence_length=cfg["model"]["max_tokens"], output_type="latent").images
save_file({"latents": latents.contiguous()}, sys.argv[2])
"""
TWO_RANKS = """
import json, sys
from pathlib import Path
from paraflow.api import compose
from paraflow.many import launch_many, prepared
out, run, cases = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
launch_many([prepared(compose([*run, *extra]), out / name) for name, extra in cases.items()])
"""


@pytest.fixture(scope="module")
def family_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_outside("outside_family", tmp_path_factory.mktemp("family"))


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def _latents(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "latents.safetensors"))["latents"]


@pytest.fixture(scope="module")
def runs(family_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One device, data ×2, sync_patch ×2, naive_patch ×2 and the stock pipeline."""
    out = tmp_path_factory.mktemp("runs")
    one = _run(family_path, out, "-m", "paraflow", *RUN, "output_dir=one")
    assert one.returncode == 0, one.stderr[-3000:]
    cases = {name: [f"+strategy={strategy}", "launcher.devices=2"]
             for name, strategy in (("data", "data"), ("sync", "sync_patch"),
                                    ("naive", "naive_patch"))}
    two = _run(family_path, out, "-c", TWO_RANKS, str(out), json.dumps(RUN), json.dumps(cases))
    assert two.returncode == 0, two.stderr[-3000:]
    stock = _run(family_path, out, "-c", STOCK, str(out / "one" / "run.json"),
                 str(out / "stock.safetensors"))
    assert stock.returncode == 0, stock.stderr[-3000:]
    return out


def test_paraflow_does_not_name_the_family() -> None:
    for folder in ("paraflow", "strategies"):
        for path in (REPO / folder).rglob("*.py"):
            assert "auraflow" not in path.read_text().lower(), path


def test_one_device_equals_the_stock_pipeline(runs: Path) -> None:
    record = json.loads((runs / "one" / "run.json").read_text())
    assert record["model"] == "tiny_auraflow_random"
    stock = load_file(str(runs / "stock.safetensors"))["latents"]
    assert float((_latents(runs / "one") - stock).abs().max()) <= 1e-5


@pytest.mark.parametrize(("name", "tolerance"), [("data", 1e-4), ("sync", 1e-5)])
def test_two_ranks_equal_one_device(runs: Path, name: str, tolerance: float) -> None:
    diff = float((_latents(runs / name) - _latents(runs / "one")).abs().max())
    print(f"{name} ×2: max |latents - one device| = {diff:.2e}")
    assert diff <= tolerance


def test_bands_attending_only_to_themselves_are_caught(runs: Path) -> None:
    assert float((_latents(runs / "naive") - _latents(runs / "one")).abs().max()) >= 1e-4
