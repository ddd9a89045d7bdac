"""Hybrid layouts (data × cfg × patch/tensor on one DeviceMesh): the pre-launch checks without
processes, then 4 gloo ranks (one launch, several runs) against the single-device run.

Tolerance: hybrid layouts of exact strategies match single device within 1e-4 max abs difference
of the final fp32 latents (the bound the other exact strategies are held to)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.mesh import dim_groups, hybrid_layout
from paraflow.registry import build_strategy
from paraflow.validate import validate
from tests.patch_helpers import config, run_many

from .conftest import read_images, read_latents, run_paraflow

TOL = 1e-4
BASE = ["model=tiny_random", "height=64", "width=64", "steps=2"]
FOUR = [*BASE, "prompt=[a red circle,a blue square]", "images_per_prompt=2"]
THREE = [*BASE, "prompt=[a red circle,a blue square,a green star]"]  # uneven over 2 replicas


# --- without processes ------------------------------------------------------------------------

def test_mesh_dims_are_ordered_with_the_inner_dim_contiguous() -> None:
    layout = hybrid_layout(8, 2, True, "patch")
    assert list(layout.items()) == [("data", 2), ("cfg", 2), ("patch", 2)]
    assert dim_groups(layout, "patch") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours
    assert dim_groups(layout, "cfg") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dim_groups(layout, "data") == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize(("overrides", "message"), [
    (["+strategy=sync_patch", "launcher.devices=4", "strategy.data_degree=3"],
     r"data_degree=3: .* must equal the world size 4 .*possible data_degree values for 4 ranks: "
     r"1, 2, 4$"),
    (["+strategy=tensor", "launcher.devices=2", "launcher.num_nodes=3", "strategy.data_degree=4",
      "strategy.cfg_split=true"],
     r"do not split into 8 equal parts; possible data_degree values for 6 ranks: 1, 3$"),
    (["+strategy=tensor", "launcher.devices=4", "strategy.data_degree=8"],
     r"data_degree=8 is larger than the world size 4"),
    (["+strategy=distrifusion", "launcher.devices=2", "strategy.data_degree=0"],
     r"data_degree=0: must be at least 1"),
    (["+strategy=tensor", "launcher.devices=3", "strategy.cfg_split=true"],
     r"possible data_degree values for 3 ranks: none, use an even rank count"),
    (["+strategy=tensor", "launcher.devices=16", "strategy.cfg_split=true"],  # 8 tensor ranks
     r"over 8 tensor ranks \(16 = data 1 × cfg 2 × tensor 8\).* allows: 1, 2, 4"),
    (["+strategy=tensor", "launcher.devices=4", "strategy.cfg_split=true", "guidance_scale=1"],
     r"turns guidance off"),
])
def test_bad_layouts_are_refused_before_launch(overrides: list[str], message: str,
                                               tmp_path: Path) -> None:
    with pytest.raises(ParaflowError, match=message):
        validate(compose(["model=tiny_random", *overrides]), tmp_path)


def test_inner_degree_is_what_the_replicas_and_cfg_leave(tmp_path: Path) -> None:
    cfg = compose(["model=tiny_random", "+strategy=tensor", "launcher.devices=8",
                   "strategy.data_degree=2", "strategy.cfg_split=true"])
    validate(cfg, tmp_path)
    strategy = build_strategy(cfg.strategy)
    assert strategy.degree(cfg) == 2
    assert strategy.mesh_layout(8) == {"data": 2, "cfg": 2, "tensor": 2}
    # 4 bands of 64² (8 latent rows) are too thin for the tiny UNet; 2 replicas × 2 bands fit.
    patch = ["model=tiny_random", "+strategy=sync_patch", "launcher.devices=4"]
    with pytest.raises(ParaflowError, match="valid heights"):
        validate(compose(patch), tmp_path)
    validate(compose([*patch, "strategy.data_degree=2"]), tmp_path)


# --- 4 gloo ranks against one device ----------------------------------------------------------

# name -> (prompts and size, the parallel run's overrides)
CASES = {
    "data2_patch2": (FOUR, ["+strategy=sync_patch", "strategy.data_degree=2"]),
    "cfg2_tensor2": (FOUR, ["+strategy=tensor", "strategy.cfg_split=true"]),
    # warm-up covering every step: exact; the patch decode splits rows over a replica's 2 ranks
    "data2_cfg2_decode": (THREE, ["+strategy=distrifusion", "strategy.warmup_steps=2",
                                  "strategy.data_degree=2", "strategy.cfg_split=true",
                                  "pipeline.stages.decode.parallel=patch"]),
}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("hybrid")
    run_paraflow(root / "single4", [*FOUR, "save_latents=true"])
    run_paraflow(root / "single3", [*THREE, "save_latents=true"])
    cfgs = [config([*base, *extra, "launcher.devices=4"], root / name)
            for name, (base, extra) in CASES.items()]
    return root, dict(zip(CASES, run_many(cfgs)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_hybrid_equals_single_device(four_ranks: tuple[Path, dict[str, Any]], name: str) -> None:
    root, runs = four_ranks
    n = runs[name]["n_images"]
    single = root / f"single{n}"
    ours, reference = read_latents(root / name), read_latents(single)
    assert ours.shape == reference.shape == (n, 4, 8, 8)
    diff = float((ours - reference).abs().max())
    print(f"{name}: max |latents - single| = {diff:.2e}")
    assert torch.allclose(ours, reference, atol=TOL), diff
    assert runs[name]["images"] == [f"images/{i:04d}.png" for i in range(n)]
    for got, want in zip(read_images(root / name), read_images(single), strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # uint8 grey levels


@pytest.mark.slow
def test_run_json_records_the_mesh(four_ranks: tuple[Path, dict[str, Any]]) -> None:
    _, runs = four_ranks
    data_patch, cfg_tensor = runs["data2_patch2"], runs["cfg2_tensor2"]
    assert data_patch["mesh"] == {"data": 2, "cfg": 1, "patch": 2}
    assert data_patch["images_per_rank"] == [2, 2, 2, 2]  # each replica: 2 images, 2 bands
    assert data_patch["strategy_mode"] == "sync_patch data_degree=2"
    assert cfg_tensor["mesh"] == {"data": 1, "cfg": 2, "tensor": 2}
    assert cfg_tensor["images_per_rank"] == [4, 4, 4, 4]
    assert len(set(cfg_tensor["comm_bytes"])) == 1  # symmetric: nothing gathered at the end
    three = runs["data2_cfg2_decode"]
    assert three["mesh"] == {"data": 2, "cfg": 2, "patch": 1}
    assert three["images_per_rank"] == [2, 2, 1, 1]  # replica 0 takes the larger block
