"""Shared by the serving tests: an in-process instance, decoding answers, free loopback ports."""

from __future__ import annotations

import base64
import io
import socket
from typing import Any

import numpy as np
from PIL import Image

INSTANCE = ["model=tiny_random", "launcher.threads_per_rank=1", "serve.instance.warmup=false"]


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


def images_of(answer: dict[str, Any]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))))
            for d in answer["data"]]


def counter(app: Any, name: str) -> float:
    """A metric's value (summed over labels) from the app's engine registry."""
    registry = app.state.engine.metrics.registry
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)
