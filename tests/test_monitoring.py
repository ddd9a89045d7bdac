"""The monitoring in deploy/ works with the real tools. Fast: promtool (Debian's `prometheus`)
accepts the config and rules and passes the rules' unit tests; Grafana's provisioning files and
dashboard carry what Grafana's provisioning reads (Grafana itself is not in Debian's archive, so
this checks the files, not a running Grafana); every metric they name is exported. Slow: a real
Prometheus scrapes a two-instance service on loopback and answers every dashboard query with
data, and has every rule loaded and healthy."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from paraflow.serve.local import LocalService, free_ports
from paraflow.serve.metrics import InstanceMetrics
from tests.conftest import REPO

PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "paraflow.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "paraflow.json"
DATASOURCE_UID = "paraflow-prometheus"
# NVML's gauges have no series on CPU, and the OOM counter none until an OOM: their panels are
# answered, with no data, on this machine.
ABSENT_ON_CPU = {"paraflow_device_temperature_celsius", "paraflow_device_power_watts",
                 "paraflow_device_throttled", "paraflow_device_utilization_percent",
                 "paraflow_oom_total"}
# A metric name in PromQL: not part of a longer name, nor of a recorded name (job:...:p99_5m).
PARAFLOW_NAME = re.compile(r"(?<![\w:])paraflow_[a-z_]+")
HAPROXY_NAME = re.compile(r"(?<![\w:])haproxy_[a-z_]+")
RECORDED_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_:]+")



def promtool(*args: str) -> str:
    assert shutil.which("promtool"), "promtool is needed (Debian: apt-get install prometheus)"
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def config_copy(into: Path, interval: str | None = None) -> Path:
    """The shipped config folder copied into `into`, with empty targets files (the deployment
    writes them); `interval`: scrape and evaluate that often instead."""
    folder = into / "prometheus"
    shutil.copytree(PROMETHEUS, folder)
    (folder / "targets").mkdir(exist_ok=True)
    for name in ("paraflow", "haproxy"):
        (folder / "targets" / f"{name}.json").write_text("[]")
    config = folder / "prometheus.yml"
    if interval:
        text = yaml.safe_load(config.read_text())
        text["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
        config.write_text(yaml.safe_dump(text))
    return config


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def exported_names() -> set[str]:
    """Every sample name an instance can export: each family's name and its suffixes."""
    names = set()
    metrics = InstanceMetrics()
    metrics.redis_up(True)  # exported where a Redis cache is configured
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_prometheus_config(tmp_path: Path) -> None:
    out = promtool("check", "config", str(config_copy(tmp_path)))
    assert "WARNING" not in out, out
    assert "SUCCESS: 1 rule files found" in out, out


def test_rules_check_and_unit_tests() -> None:
    promtool("check", "rules", str(RULES))
    tests = PROMETHEUS / "tests" / "paraflow_test.yml"
    assert "SUCCESS" in promtool("test", "rules", str(tests))
    # Every alert is tested firing and not firing.
    cases = [c for t in yaml.safe_load(tests.read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    for alert in (r["alert"] for r in rules() if "alert" in r):
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no test where it does not"


def test_alerts_say_what_to_do() -> None:
    for rule in rules():
        if "alert" in rule:
            assert {"summary", "action"} <= set(rule["annotations"]), rule["alert"]
    immediate = {r["alert"]: r["for"] for r in rules()
                 if r.get("alert") in ("ParaflowOutOfMemory", "ParaflowThermalThrottling")}
    assert immediate == {"ParaflowOutOfMemory": "0m", "ParaflowThermalThrottling": "0m"}


def test_grafana_provisioning() -> None:
    """What Grafana's provisioning reads: apiVersion 1, a datasource with the uid the dashboard
    names, a file provider with a path."""
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["access"] == "proxy" and source["url"] and source["name"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/paraflow.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["name"] and provider["type"] == "file" and provider["options"]["path"]


def test_dashboard_json() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] and p["title"], p
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in "hwxy") and pos["x"] + pos["w"] <= 24, p
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["datasource"]["uid"] == DATASOURCE_UID, p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("throughput", "latency", "queue", "memory", "temperature", "power",
                   "throttling", "errors", "cache hit", "instances up", "haproxy"):
        assert wanted in titles, wanted


def test_every_metric_named_is_exported() -> None:
    """Each paraflow_* name in the dashboard and rules is one an instance exports, and each
    recorded name one the rules record (HAProxy's names: the slow test reads its exporter)."""
    exprs = [e for _, e in panel_exprs()] + [r["expr"] for r in rules()]
    used = {n for e in exprs for n in PARAFLOW_NAME.findall(e)}
    assert not used - exported_names(), f"not exported: {sorted(used - exported_names())}"
    recorded = {n for e in exprs for n in RECORDED_NAME.findall(e)}
    assert recorded <= {r["record"] for r in rules() if "record" in r}


def until(what: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    """what()'s first truthy answer within timeout_s, else its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = what()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(every_s)


@pytest.mark.slow
def test_prometheus_scrapes_the_service(tmp_path: Path) -> None:
    service = LocalService(tmp_path / "serve", 2, ["model=tiny_random",
                                                   "serve.instance.warmup=false",
                                                   "launcher.threads_per_rank=1"], cwd=REPO)
    prometheus: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "prometheus.log").open("wb")
    try:
        service.wait_ready()
        config = config_copy(tmp_path, interval="1s")
        instances = [service.instance_url(n).removeprefix("http://") for n, _ in service.servers()]
        front = urllib.parse.urlsplit(service.exporter).netloc
        (config.parent / "targets" / "paraflow.json").write_text(
            json.dumps([{"targets": instances}]))
        (config.parent / "targets" / "haproxy.json").write_text(json.dumps([{"targets": [front]}]))
        port = free_ports(1)[0]
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{port}/api/v1"

        def query(expr: str) -> list[dict[str, Any]]:
            try:
                answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
            except httpx.HTTPError:
                return []
            if answer.status_code == 503:  # still starting: "Service Unavailable", not JSON
                return []
            reply = answer.json()
            assert reply["status"] == "success", (expr, reply)
            return list(reply["data"]["result"])

        up = until(lambda: len(query("up == 1")) == 3, 30)  # both instances and HAProxy
        assert up, (query("up"), (tmp_path / "prometheus.log").read_text()[-3000:])
        # Traffic after the first scrapes, so that the rates see it: the same prompt (embedding
        # cache hits), and one refused request (an error by kind).
        with httpx.Client(timeout=60) as client:
            for seed in range(6):
                body = {"prompt": "a red circle", "seed": seed, "steps": 3, "size": "64x64"}
                answer = client.post(f"{service.url}/v1/images/generations", json=body)
                assert answer.status_code == 200, answer.text
            refused = client.post(f"{service.url}/v1/images/generations",
                                  json={"prompt": "a red circle", "steps": 10_000})
            assert refused.status_code == 400

        empty = []
        for title, expr in panel_exprs():
            promql = expr.replace("$__rate_interval", "30s")
            names = set(PARAFLOW_NAME.findall(expr))
            if names and names <= ABSENT_ON_CPU:  # answered; on CPU, with no series
                result = query(promql)
                assert torch.cuda.is_available() or result == [], f"{title}: {promql}: {result}"
            elif not until(functools.partial(query, promql), 15):
                empty.append(f"{title}: {promql}")
        assert not empty, "no data:\n" + "\n".join(empty)
        assert float(query("sum(rate(paraflow_images_total[30s]))")[0]["value"][1]) > 0

        def rule_health() -> dict[str, str]:
            groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            return health if set(health.values()) == {"ok"} else {}

        health = until(rule_health, 10)
        assert set(health) == {r.get("alert") or r["record"] for r in rules()}, health
        # Every HAProxy metric named is one its exporter serves.
        served = httpx.get(service.exporter, timeout=5).text
        exprs = [e for _, e in panel_exprs()] + [r["expr"] for r in rules()]
        for name in {n for e in exprs for n in HAPROXY_NAME.findall(e)}:
            assert f"\n{name}{{" in served, name
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
        log.close()
        if service.process.poll() is None:
            service.stop()
