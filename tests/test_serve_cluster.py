"""`python -m paraflow.serve` for real: two single-device instances behind HAProxy, supervised.
A bounded load (60 requests, 8 concurrent clients) is answered once each, every image equal to
the same request run alone; SIGKILL of one instance mid-load loses nothing (HAProxy re-sends its
in-flight requests to the other), the supervisor restarts it and HAProxy readmits it (timed);
past the queue bound clients get 429 with Retry-After and the service recovers; SIGTERM leaves no
process behind. Everything on loopback, on free ports."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paraflow.serve.engine import Job
from paraflow.serve.instance import build
from paraflow.serve.requests import ImagesRequest
from tests.conftest import REPO
from tests.serve_helpers import free_ports, images_of

pytestmark = pytest.mark.slow
MODEL = ["model=tiny_random", "serve.instance.warmup=false"]
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle", "a white star"]


def body(i: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": 3, "size": "64x64"}


class Service:
    def __init__(self, run_dir: Path, extra: list[str]) -> None:
        front, stats, base = free_ports(3)
        self.run_dir, self.url = run_dir, f"http://127.0.0.1:{front}"
        self.stats = f"http://127.0.0.1:{stats}/metrics"
        args = [*MODEL, "launcher.devices=2", "launcher.threads_per_rank=1",
                f"output_dir={run_dir}", f"serve.front.port={front}",
                f"serve.front.stats_port={stats}", f"serve.instance.base_port={base}",
                "serve.restart_backoff_s=0.2", *extra]
        self.process = subprocess.Popen([sys.executable, "-m", "paraflow.serve", *args],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.process.stdout.read().decode() if self.process.stdout
                                   else "paraflow.serve exited")
            if all(self.server_up(name) for name in ("i0", "i1")):
                return
            time.sleep(0.2)
        raise TimeoutError("the service did not come up")

    def server_up(self, name: str) -> bool:
        try:
            text = httpx.get(self.stats, timeout=2).text
        except httpx.HTTPError:
            return False
        return (f'haproxy_server_status{{proxy="instances",server="{name}",state="UP"}} 1'
                in text)

    def children(self) -> dict[str, int]:
        rows = json.loads((self.run_dir / "instances.json").read_text())
        return {r["name"]: r["pid"] for r in rows}

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / "events.jsonl").read_text()
                .splitlines()]

    def stop(self) -> None:
        pids = list(self.children().values())
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        for pid in pids:  # nothing left running
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    run = Service(tmp_path_factory.mktemp("serve"), ["serve.front.max_queue=12"])
    try:
        run.wait_ready()
        yield run
    finally:
        if run.process.poll() is None:
            run.stop()


@pytest.fixture(scope="module")
def alone() -> Any:
    """The same requests run alone, in this process, by an instance's engine."""
    engine = build([*MODEL, "launcher.threads_per_rank=1"])[1].state.engine

    def run(i: int) -> np.ndarray:
        request = ImagesRequest(**body(i))
        png = engine.submit(Job(request, 64, 64, request.seed or 0)).result(60)[0]
        return images_of({"data": [{"b64_json": base64.b64encode(png)}]})[0]

    return run


def post_all(url: str, indices: range, clients: int, on_answer: Any = None) -> dict[int, Any]:
    def one(i: int) -> tuple[int, Any]:
        with httpx.Client(timeout=120) as client:
            answer = client.post(f"{url}/v1/images/generations", json=body(i))
        if on_answer is not None:
            on_answer(i)
        return i, answer

    with ThreadPoolExecutor(clients) as pool:
        return dict(pool.map(one, indices))


def test_a_load_is_answered_once_each_with_the_images_of_requests_alone(
        service: Service, alone: Any) -> None:
    answers = post_all(service.url, range(60), clients=8)
    assert sorted(answers) == list(range(60))
    assert all(a.status_code == 200 for a in answers.values()), \
        [a.text for a in answers.values() if a.status_code != 200][:3]
    for i in (0, 1, 2, 3, 17, 59):
        assert np.array_equal(images_of(answers[i].json())[0], alone(i)), i


def test_a_killed_instance_loses_nothing_and_comes_back(service: Service) -> None:
    victim = service.children()["i1"]
    killed: list[float] = []

    def kill_once(i: int) -> None:
        if i >= 10 and not killed:
            killed.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)

    answers = post_all(service.url, range(100, 160), clients=8, on_answer=kill_once)
    assert killed and all(a.status_code == 200 for a in answers.values()), \
        [a.text for a in answers.values() if a.status_code != 200][:3]
    assert sorted(answers) == list(range(100, 160))  # each request answered once
    deadline = time.monotonic() + 120
    while not service.server_up("i1") and time.monotonic() < deadline:
        time.sleep(0.1)
    readmitted = time.monotonic() - killed[0]
    print(f"SIGKILL to HAProxy readmitting the restarted instance: {readmitted:.1f} s")
    assert service.server_up("i1")
    kinds = [(e["event"], e.get("name")) for e in service.events()]
    assert ("exit", "i1") in kinds and ("restart", "i1") in kinds
    assert service.children()["i1"] != victim


def test_past_the_queue_bound_clients_get_429_and_the_service_recovers(
        service: Service) -> None:
    slow = {"prompt": "a red circle", "steps": 60, "size": "128x128"}

    def one(_: int) -> httpx.Response:
        with httpx.Client(timeout=300) as client:
            return client.post(f"{service.url}/v1/images/generations", json=slow)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(24)))
    codes = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 429]
    assert refused and set(codes) <= {200, 429}, codes
    assert all(a.headers["retry-after"] == "2" for a in refused)
    assert "queue is full" in refused[0].json()["error"]["message"]
    again = httpx.post(f"{service.url}/v1/images/generations", json=body(0), timeout=60)
    assert again.status_code == 200


def test_sigterm_stops_every_process(tmp_path: Path) -> None:
    run = Service(tmp_path / "run", [])
    run.wait_ready()
    run.stop()
    assert run.process.returncode == 0
    assert run.events()[-1]["event"] == "stopped"
