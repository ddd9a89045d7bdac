"""LoRA per request on rank groups, for real (`python -m paraflow.serve`, 4 ranks on loopback):
a 2-rank sync_patch instance (i0) and a 2-rank Ulysses one (L0) load the same two adapters
(serve.lora; one adapts attention, one the 3×3 convolutions, which the patch strategies split
into bands); requests with different adapters in flight together on each group each give the
image of one device with just that LoRA loaded (both strategies are exact: latents within 1e-4,
pixels within 1 grey level)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from paraflow.serve.local import LocalService
from tests.conftest import REPO
from tests.serve_helpers import images_of, run_alone, served_lora

pytestmark = pytest.mark.slow
CHOICES = [[("ink", 0.8)], [("sky", 1.5)], [], [("sky", 0.5), ("ink", 1.0)]]


def test_rank_groups_switch_adapters_per_request(adapters: dict[str, Path],
                                                 tmp_path: Path) -> None:
    service = LocalService(tmp_path / "serve", 4, [
        "model=tiny_random", "serve.instance.warmup=false", "launcher.threads_per_rank=1",
        "+strategy=sync_patch", "serve.instance.devices=2", "serve.large.count=1",
        "serve.large.devices=2", "serve.large.overrides=['strategy=ulysses']",
        served_lora(adapters)], cwd=REPO)
    try:
        service.wait_ready()
        assert sorted(service.servers()) == [("L0", "large"), ("i0", "instances")]

        def one(case: tuple[str, int]) -> httpx.Response:
            name, i = case
            body = {"prompt": "a red circle", "steps": 3, "seed": 10 + i, "size": "64x64",
                    "lora": [{"name": n, "scale": s} for n, s in CHOICES[i]]}
            return httpx.post(f"{service.instance_url(name)}/v1/images/generations",
                              json=body, timeout=120)

        cases = [(name, i) for name in ("i0", "L0") for i in range(len(CHOICES))]
        with ThreadPoolExecutor(len(cases)) as pool:  # all in flight together
            answers = list(pool.map(one, cases))
        strategies = {name: httpx.get(f"{service.instance_url(name)}/v1/instance").json()
                      ["strategy"] for name in ("i0", "L0")}
        assert strategies == {"i0": "sync_patch", "L0": "ulysses"}
    finally:
        service.stop()
    served, alone = {}, {}
    for (name, i), answer in zip(cases, answers):
        assert answer.status_code == 200, answer.text
        if i not in alone:  # the same request on both groups: one reference
            loras = [(adapters[n], s) for n, s in CHOICES[i]]
            alone[i] = run_alone(tmp_path, loras, 10 + i).astype(int)
        served[name, i] = images_of(answer.json())[0].astype(int)
        assert np.abs(served[name, i] - alone[i]).max() <= 1, (name, i)
    assert np.abs(served["i0", 0] - served["i0", 2]).max() > 8  # the adapters change the image
