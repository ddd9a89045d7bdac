"""The GPU check tool's own code, run tiny on the CPU (on a GPU machine: scripts/gpu_check.sh).
On one CPU device paraflow and stock diffusers run the same operations: latents equal (1e-5);
2 gloo ranks sharing the device give sync_patch's exact result (1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paraflow.tools.gpu_check import main

pytestmark = pytest.mark.slow


def test_gpu_check_quick_on_cpu(tmp_path: Path) -> None:
    main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["model"] for p in results["parity"]] == ["tiny", "tiny_xl_random"]
    assert all(p["max_abs_latents"] <= 1e-5 for p in results["parity"])
    assert [case["model"] for case in results["bands"]] == ["tiny_xl_random", "tiny_flux_random"]
    assert all([b["bands"] for b in case["rows"]] == [1, 2, 4, 8] for case in results["bands"])
    assert results["shared"]["ok"] and results["shared"]["max_abs_latents"] <= 1e-4
    assert results["device"]["device"] == "cpu" and results["device"]["memory"] > 0
    assert "GPU check on CPU" in (tmp_path / "gpu_check.md").read_text()
    flux, unet = ({r["name"]: r for r in case["rows"]} for case in results["accelerate"])
    for rows, skipped in ((flux, "deepcache 3"), (unet, "taylorseer 3")):
        assert "skipped" in rows[skipped] and "skipped" in rows["sdpa_flash"]  # on a CPU
        assert "skipped" in rows["regional reduce-overhead"]
        assert rows["regional"]["graph_breaks"] == 0 and rows["full"]["graph_breaks"] == 0
        assert rows["regional"]["psnr_image_db"] > 60  # dynamo's capture: the same operations
        assert rows["first_block 0.1"]["denoiser_calls"] <= 6
