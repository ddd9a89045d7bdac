"""`python -m paraflow.serve`: the instances and HAProxy on this machine, kept running.

Instance i is `python -m paraflow.serve.instance` on serve.instance.base_port + i (on CUDA with
CUDA_VISIBLE_DEVICES set to its devices), logging to i<i>.log in the run folder; with
serve.large.count > 0, large instance j (a rank group, serve.large.overrides) is L<j>, which
HAProxy sends the requests of serve.large.min_pixels or more. An
instance that exits is restarted after a backoff that doubles up to serve.restart_backoff_max_s
(reset once it has stayed up a minute); one not ready within serve.ready_timeout_s is killed and
restarted; HAProxy takes it back once its /readyz answers. SIGTERM or SIGINT stops everything,
instances first, and waits for every process. What happens is appended to events.jsonl; the
instances' state is served at /v1/instances (through HAProxy) for the page.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig

from paraflow.errors import ParaflowError
from paraflow.serve.haproxy import STATUS_PATH, haproxy_config

POLL_S = 0.2
STABLE_S = 60.0  # up this long: the next crash starts the backoff afresh


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    ready_url: str | None = None
    backend: str = ""  # the HAProxy backend it serves in
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready: bool = False
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None

    def start(self) -> None:
        handle: IO[bytes] = open(self.log, "ab")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.started, self.ready = time.monotonic(), self.ready_url is None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive() and self.process is not None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass


def _status_handler(supervisor: Supervisor) -> type[BaseHTTPRequestHandler]:
    class Status(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != STATUS_PATH:
                self.send_error(404)
                return
            body = json.dumps({"instances": supervisor.view()}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return None  # HAProxy's log is the access log

    return Status


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Kind:
    """Instances alike: `count` of `ranks` ranks each, from `base_port`, named prefix + i."""

    prefix: str
    count: int
    ranks: int
    base_port: int
    overrides: tuple[str, ...] = ()


def kinds_of(cfg: DictConfig) -> tuple[Kind, Kind]:
    """(small, large): the devices left after the large instances make small ones."""
    serve, devices = cfg.serve, int(cfg.launcher.devices)
    large = Kind("L", int(serve.large.count), int(serve.large.devices),
                 int(serve.large.base_port), tuple(serve.large.overrides))
    per, rest = int(serve.instance.devices), devices - large.count * large.ranks
    if rest < 0 or rest % per or (rest == 0 and large.count == 0):
        raise ParaflowError(f"launcher.devices={devices}: after serve.large ({large.count} × "
                            f"{large.ranks} ranks) the {rest} device(s) left do not make "
                            f"instances of serve.instance.devices={per}")
    return Kind("i", rest // per, per, int(serve.instance.base_port)), large


class Supervisor:
    def __init__(self, cfg: DictConfig, overrides: Sequence[str], run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        serve = cfg.serve
        small, large = kinds_of(cfg)
        ranks = small.count * small.ranks + large.count * large.ranks
        threads = cfg.launcher.threads_per_rank or max(1, (os.cpu_count() or 1) // ranks)
        cuda = str(getattr(cfg.launcher.accelerator, "value", cfg.launcher.accelerator)) == "cuda"
        host = str(serve.instance.host)
        self.instances: list[Child] = []
        backends: dict[str, list[tuple[str, str]]] = {"instances": [], "large": []}
        first_device = 0
        for kind, backend in ((small, "instances"), (large, "large")):
            for i in range(kind.count):
                port = kind.base_port + i
                env = dict(os.environ)
                if cuda:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(
                        str(first_device + d) for d in range(kind.ranks))
                first_device += kind.ranks
                command = [sys.executable, "-m", "paraflow.serve.instance", *overrides,
                           *kind.overrides, f"serve.instance.devices={kind.ranks}",
                           f"serve.instance.port={port}", f"launcher.threads_per_rank={threads}"]
                name = f"{kind.prefix}{i}"
                self.instances.append(Child(name, command, env, run_dir / f"{name}.log",
                                            f"http://{host}:{port}/readyz", backend))
                backends[backend].append((name, f"{host}:{port}"))
        backends["instances"] += [(f"remote{i}", str(a)) for i, a in enumerate(serve.remote)]
        self.status = ThreadingHTTPServer((host, 0), _status_handler(self))
        status = f"{host}:{self.status.server_address[1]}"
        config = run_dir / "haproxy.cfg"
        config.write_text(haproxy_config(serve, backends["instances"], status,
                                         large=backends["large"]))
        self.haproxy = Child("haproxy", [str(serve.front.binary), "-db", "-f", str(config)],
                             dict(os.environ), run_dir / "haproxy.log")
        self.stopping = threading.Event()

    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"t": time.time(), "event": kind, **fields})
        with open(self.run_dir / "events.jsonl", "a") as out:
            out.write(line + "\n")

    def state(self) -> None:
        """instances.json: each child's pid and port (for operators and the tests)."""
        rows = [{"name": c.name, "pid": c.process.pid if c.process else None, "ready": c.ready,
                 "restarts": c.restarts, "url": c.ready_url, "backend": c.backend}
                for c in [*self.instances, self.haproxy]]
        tmp = self.run_dir / "instances.json.tmp"
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(self.run_dir / "instances.json")

    def view(self) -> list[dict[str, Any]]:
        """Every instance as the page shows it: health, restarts, queue (asked of each)."""
        rows = []
        for child in self.instances:
            row: dict[str, Any] = {"name": child.name, "up": child.alive() and child.ready,
                                   "restarts": child.restarts, "kind": child.backend}
            if row["up"] and child.ready_url is not None:
                try:
                    url = child.ready_url.replace("/readyz", "/v1/instance")
                    with urllib.request.urlopen(url, timeout=0.5) as reply:
                        info = json.loads(reply.read())
                    row.update(queue_depth=info["queue_depth"], in_flight=info["in_flight"])
                except (OSError, ValueError, KeyError):
                    row["up"] = False
            rows.append(row)
        return rows

    def start(self) -> None:
        threading.Thread(target=self.status.serve_forever, daemon=True).start()
        for child in [*self.instances, self.haproxy]:
            child.start()
            self.event("start", name=child.name, pid=child.process.pid if child.process else None)
        self.state()

    def _watch(self, child: Child) -> None:
        now, serve = time.monotonic(), self.cfg.serve
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                child.start()
                self.event("restart", name=child.name, restarts=child.restarts,
                           pid=child.process.pid if child.process else None)
                self.state()
            return
        if not child.alive():
            code = child.process.returncode if child.process else None
            if now - child.started > STABLE_S:
                child.backoff = 0.0
            child.backoff = min(float(serve.restart_backoff_max_s),
                                max(float(serve.restart_backoff_s), 2 * child.backoff))
            child.restart_at, child.ready = now + child.backoff, False
            self.event("exit", name=child.name, code=code, restart_in_s=child.backoff)
            self.state()
            return
        if not child.ready and child.ready_url is not None:
            if _answers(child.ready_url):
                child.ready = True
                self.event("ready", name=child.name, after_s=now - child.started)
                self.state()
            elif now - child.started > float(serve.ready_timeout_s):
                self.event("not_ready", name=child.name, after_s=now - child.started)
                child.stop(signal.SIGKILL)

    def run(self) -> None:
        """Watch until stop() (a signal handler) is called; then stop every child."""
        try:
            while not self.stopping.wait(POLL_S):
                for child in [*self.instances, self.haproxy]:
                    self._watch(child)
        finally:
            self.shutdown()

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def shutdown(self, grace_s: float = 10.0) -> None:
        for group in (self.instances, [self.haproxy]):
            for child in group:
                child.stop()
            deadline = time.monotonic() + grace_s
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.stop(signal.SIGKILL)
                    child.process.wait()
        self.status.shutdown()
        self.status.server_close()
        self.event("stopped")
