"""The container and Kubernetes examples stay true: every probe path exists in the instance's
app and every probe port is the port the instance listens on (the Dockerfile's), the instance
arguments compose, and the HAProxy config in the manifests carries every directive paraflow's
own generated config has (haproxy -c accepts it)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from paraflow.api import compose
from paraflow.serve.haproxy import haproxy_config
from paraflow.serve.instance import build
from tests.conftest import REPO
from tests.serve_helpers import INSTANCE

DEPLOY = REPO / "deploy"


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "paraflow.yaml").read_text()) if d]


def containers(role: str) -> list[dict[str, Any]]:
    return [c for d in manifests() if d["kind"] == "Deployment"
            and d["spec"]["template"]["metadata"]["labels"]["role"] == role
            for c in d["spec"]["template"]["spec"]["containers"]]


def dockerfile() -> tuple[int, list[str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    exposed = int(re.search(r"^EXPOSE (\d+)", text, re.M)[1])  # type: ignore[index]
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1])  # type: ignore[index]
    return exposed, entry


def test_the_image_runs_the_instance_on_the_exposed_port() -> None:
    exposed, entry = dockerfile()
    assert entry[:3] == ["python", "-m", "paraflow.serve.instance"]
    assert importlib.util.find_spec(entry[2]) is not None
    assert f"serve.instance.port={exposed}" in entry


def test_every_probe_path_and_port_exists_in_the_instance() -> None:
    app = build(INSTANCE)[1]
    paths = {route.path for route in app.routes}
    exposed, entry = dockerfile()
    (instance,) = containers("instance")
    ports = {p["name"]: p["containerPort"] for p in instance["ports"]}
    probes = [instance[k] for k in ("readinessProbe", "livenessProbe")]
    for probe in probes:
        get = probe["httpGet"]
        assert get["path"] in paths, get
        assert ports[get["port"]] == exposed
    assert {p["httpGet"]["path"] for p in probes} == {"/readyz", "/healthz"}
    # the arguments are valid run and serve overrides (composed with the image's own)
    cfg = compose([a for a in [*entry[3:], *instance["args"]] if not a.startswith("model.path")])
    assert cfg.serve.instance.port == exposed and cfg.serve.cache.redis_url


def test_the_manifests_haproxy_carries_paraflows_directives(tmp_path: Path) -> None:
    (config_map,) = [d for d in manifests() if d["kind"] == "ConfigMap"]
    shipped = config_map["data"]["haproxy.cfg"]
    have = {" ".join(line.split()) for line in shipped.splitlines()}
    generated = haproxy_config(compose([]).serve, [])
    skip = ("bind ", "server ", "tune.", "maxconn 4096", "global", "stats refresh",
            "timeout http-request")
    for line in generated.splitlines():
        words = " ".join(line.split())
        if words and not words.startswith(skip):
            assert words in have, words
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is needed (Debian: apt-get install haproxy)"
    (tmp_path / "haproxy.cfg").write_text(shipped)
    check = subprocess.run([binary, "-c", "-f", str(tmp_path / "haproxy.cfg")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
