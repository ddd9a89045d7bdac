"""`python -m paraflow.serve` as a child process on free loopback ports, for benchmarks, tests and
notebooks: start it, wait until HAProxy has every instance up, read its state, stop it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound, read, released together)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def server_up(exporter: str, name: str, backend: str = "instances") -> bool:
    """Whether HAProxy's Prometheus exporter at `exporter` shows server `name` up."""
    try:
        with urllib.request.urlopen(exporter, timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return False
    return f'haproxy_server_status{{proxy="{backend}",server="{name}",state="UP"}} 1' in text


class LocalService:
    def __init__(self, run_dir: Path, devices: int, overrides: Sequence[str] = (),
                 cwd: Path | None = None, ranks_per_instance: int = 1) -> None:
        """`devices`: launcher.devices, split into instances of `ranks_per_instance` ranks
        (and serve.large's, if the overrides ask for them)."""
        front, stats, base, large = free_ports(4)
        self.run_dir = run_dir
        self.url = f"http://127.0.0.1:{front}"
        self.exporter = f"http://127.0.0.1:{stats}/metrics"
        self.base_port = base
        args = [f"launcher.devices={devices}", f"serve.instance.devices={ranks_per_instance}",
                f"output_dir={run_dir}", f"serve.front.port={front}",
                f"serve.front.stats_port={stats}", f"serve.instance.base_port={base}",
                f"serve.large.base_port={large}", *overrides]
        self.process = subprocess.Popen([sys.executable, "-m", "paraflow.serve", *args], cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def servers(self) -> list[tuple[str, str]]:
        """(name, HAProxy backend) of every instance the supervisor started."""
        state = self.run_dir / "instances.json"
        if not state.exists():
            return []
        return [(r["name"], r["backend"]) for r in json.loads(state.read_text())
                if r["backend"]]

    def instance_url(self, name: str) -> str:
        """The address of instance `name` (i0, L0, ...), from the supervisor's state."""
        rows = json.loads((self.run_dir / "instances.json").read_text())
        url = next(r["url"] for r in rows if r["name"] == name)
        return str(url).removesuffix("/readyz")

    def wait_ready(self, timeout_s: float = 180) -> float:
        """Seconds until HAProxy has every instance up; raises if the service exits first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"paraflow.serve exited: {out[-2000:]}")
            servers = self.servers()
            if servers and all(server_up(self.exporter, n, b) for n, b in servers):
                return time.monotonic() - start
            time.sleep(0.1)
        raise TimeoutError(f"the service was not up within {timeout_s} s")

    def children(self) -> dict[str, int]:
        rows = json.loads((self.run_dir / "instances.json").read_text())
        return {r["name"]: r["pid"] for r in rows}

    def events(self) -> list[dict[str, Any]]:
        lines = (self.run_dir / "events.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)
