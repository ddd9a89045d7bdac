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


def server_up(exporter: str, name: str) -> bool:
    """Whether HAProxy's Prometheus exporter at `exporter` shows server `name` up."""
    try:
        with urllib.request.urlopen(exporter, timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return False
    return f'haproxy_server_status{{proxy="instances",server="{name}",state="UP"}} 1' in text


class LocalService:
    def __init__(self, run_dir: Path, instances: int, overrides: Sequence[str] = (),
                 cwd: Path | None = None, ranks_per_instance: int = 1) -> None:
        front, stats, base = free_ports(3)
        self.run_dir, self.instances = run_dir, instances
        self.url = f"http://127.0.0.1:{front}"
        self.exporter = f"http://127.0.0.1:{stats}/metrics"
        self.base_port = base
        args = [f"launcher.devices={instances * ranks_per_instance}",
                f"serve.instance.devices={ranks_per_instance}", f"output_dir={run_dir}",
                f"serve.front.port={front}", f"serve.front.stats_port={stats}",
                f"serve.instance.base_port={base}", *overrides]
        self.process = subprocess.Popen([sys.executable, "-m", "paraflow.serve", *args], cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def names(self) -> list[str]:
        return [f"i{i}" for i in range(self.instances)]

    def instance_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.base_port + index}"

    def wait_ready(self, timeout_s: float = 180) -> float:
        """Seconds until HAProxy has every instance up; raises if the service exits first."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"paraflow.serve exited: {out[-2000:]}")
            if all(server_up(self.exporter, n) for n in self.names()):
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
