"""`python -m paraflow.serve` for real: two single-device instances behind HAProxy, supervised.
A bounded load (60 requests, 8 concurrent clients) is answered once each, every image equal to
the same request run alone; SIGKILL of one instance mid-load loses nothing (HAProxy re-sends its
in-flight requests to the other), the supervisor restarts it and HAProxy readmits it (timed);
past the queue bound clients get 429 with Retry-After and the service recovers; SIGTERM leaves no
process behind. Everything on loopback, on free ports."""

from __future__ import annotations

import os
import re
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

from paraflow.serve.instance import build
from paraflow.serve.jobs import Job
from paraflow.serve.local import LocalService, free_ports, server_up
from paraflow.serve.requests import ImagesRequest
from tests.conftest import REPO
from tests.serve_helpers import decoded, images_of

pytestmark = pytest.mark.slow
MODEL = ["model=tiny_random", "serve.instance.warmup=false"]
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle", "a white star"]


def body(i: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": 3, "size": "64x64"}


class Service(LocalService):
    """The service on the tiny model, with a fast restart, that checks it leaves nothing."""

    def __init__(self, run_dir: Path, extra: list[str]) -> None:
        super().__init__(run_dir, 2, [*MODEL, "launcher.threads_per_rank=1",
                                      "serve.restart_backoff_s=0.2", *extra], cwd=REPO)

    def server_up(self, name: str) -> bool:
        return server_up(self.exporter, name)

    def stop(self, timeout_s: float = 30) -> int:
        pids = list(self.children().values())
        code = super().stop(timeout_s)
        for pid in pids:  # nothing left running
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        return code


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
        return decoded(engine.submit(Job(request, 64, 64, request.seed or 0)).result(60)[0])

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


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_a_slow_instance_gets_less_work_than_round_robin_would_give_it(tmp_path: Path) -> None:
    from paraflow.api import compose
    from paraflow.serve.engine import SLOW_ENV
    from paraflow.serve.haproxy import haproxy_config

    front, stats, fast, slow = free_ports(4)
    processes = []
    try:
        for port, delay in ((fast, "0"), (slow, "0.2")):
            env = {**os.environ, SLOW_ENV: delay}
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "paraflow.serve.instance", *MODEL,
                 "launcher.threads_per_rank=1", f"serve.instance.port={port}"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        serve = compose([f"serve.front.port={front}", f"serve.front.stats_port={stats}"]).serve
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(serve, [("fast", f"127.0.0.1:{fast}"),
                                                 ("slow", f"127.0.0.1:{slow}")]))
        processes.append(subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        exporter = f"http://127.0.0.1:{stats}/metrics"
        deadline = time.monotonic() + 120
        while not all(server_up(exporter, n) for n in ("fast", "slow")):
            assert time.monotonic() < deadline, "the instances did not come up"
            time.sleep(0.2)
        answers = post_all(f"http://127.0.0.1:{front}", range(40), clients=4)
        assert all(a.status_code == 200 for a in answers.values())
        made = {name: _metric(f"http://127.0.0.1:{port}", "paraflow_images_total")
                for name, port in (("fast", fast), ("slow", slow))}
        print(f"40 requests, 4 clients: fast instance {made['fast']:.0f}, slow (0.2 s more per "
              f"step) {made['slow']:.0f}; round-robin would give 20 each")
        assert made["fast"] + made["slow"] == 40
        assert made["slow"] <= 10  # at most half its round-robin share
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_the_page_in_chromium_shows_progress_the_image_and_the_instances(
        service: Service) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"  # Debian's; nothing is downloaded
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Driver("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(service.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#instances tr")) == 2)
        rows = {r.get_attribute("data-name"): r.text
                for r in browser.find_elements(By.CSS_SELECTOR, "#instances tr")}
        assert set(rows) == {"i0", "i1"} and all(" up " in f" {t} " for t in rows.values())
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a blue square on the left")
        Select(browser.find_element(By.ID, "size")).select_by_visible_text("64x64")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("8")
        browser.find_element(By.ID, "seed").send_keys("5")
        browser.find_element(By.ID, "go").click()
        try:
            wait.until(lambda b: (b.find_element(By.ID, "image").get_attribute("src") or "")
                       .startswith("data:image/png;base64,"))
        except Exception:
            status = browser.find_element(By.ID, "status").text
            error = browser.find_element(By.ID, "error").text
            raise AssertionError(f"no image: status {status!r}, error {error!r}") from None
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-events") == "8"
        assert browser.find_element(By.ID, "status").text == "done (seed 5)"
        shown = browser.find_element(By.ID, "image").get_attribute("src").split(",", 1)[1]
        direct = httpx.post(f"{service.url}/v1/images/generations", timeout=60, json={
            "prompt": "a blue square on the left", "size": "64x64", "steps": 8, "seed": 5})
        assert shown == direct.json()["data"][0]["b64_json"]  # the same PNG
    finally:
        browser.quit()


def test_large_images_go_to_a_rank_group_that_equals_one_device_and_comes_back_whole(
        tmp_path: Path, alone: Any) -> None:
    """One service, one single-device instance (i0) and one 2-rank sync_patch group (L0): large
    sizes are routed to the group; the group's images equal one device's; a SIGKILL of one of its
    ranks takes the whole group out, and it is restarted whole and readmitted."""
    routed = LocalService(tmp_path / "routed", 3, [
        *MODEL, "launcher.threads_per_rank=1", "serve.restart_backoff_s=0.2",
        "serve.large.count=1", "serve.large.devices=2", "serve.large.min_pixels=16384",
        "serve.large.overrides=['+strategy=sync_patch']"], cwd=REPO)
    try:
        routed.wait_ready()
        assert sorted(routed.servers()) == [("L0", "large"), ("i0", "instances")]
        sizes = ["64x64"] * 6 + ["128x128", "96x256"] * 2  # 4096 px small; 16384, 24576 large

        def one(i: int) -> httpx.Response:
            return httpx.post(f"{routed.url}/v1/images/generations", timeout=120,
                              json={**body(i), "size": sizes[i]})

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(one, range(len(sizes))))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:2]
        made = {name: _metric(routed.instance_url(name), "paraflow_images_total")
                for name in ("i0", "L0")}
        assert made == {"i0": 6, "L0": 4}, made  # (MODEL: no warm-up image)
        group = routed.instance_url("L0")
        assert httpx.get(f"{group}/v1/instance").json()["strategy"] == "sync_patch"
        exported = httpx.get(f"{group}/metrics", timeout=5).text  # each rank's device
        assert sorted(re.findall(r'paraflow_device_memory_bytes\{[^}]*rank="(\d+)"', exported)
                      ) == ["0", "1"], exported

        direct = post_all(group, range(4), clients=2)  # the group itself, at the small size
        for i, answer in direct.items():
            assert answer.status_code == 200, answer.text
            served = images_of(answer.json())[0].astype(int)
            # sync_patch is exact (latents within 1e-4 of one device): pixels within 1 level
            assert np.abs(served - alone(i).astype(int)).max() <= 1, i
        ranks = httpx.get(f"{group}/v1/instance", timeout=5).json()["ranks"]
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)  # one rank of the group
        deadline = time.monotonic() + 60
        while server_up(routed.exporter, "L0", "large") and time.monotonic() < deadline:
            time.sleep(0.05)  # the whole instance is taken out
        assert not server_up(routed.exporter, "L0", "large")
        routed.wait_ready(timeout_s=180)  # restarted whole, readmitted
        again = httpx.get(f"{routed.instance_url('L0')}/v1/instance", timeout=5).json()["ranks"]
        assert len(again) == 2 and not set(again) & set(ranks)
        assert one(6).status_code == 200  # 128x128: the restarted group's
    finally:
        routed.stop()


def test_sigterm_stops_every_process(service: Service) -> None:
    """Last: stops the module's service (Service.stop checks that no child is left)."""
    assert service.stop() == 0
    assert service.events()[-1]["event"] == "stopped"
