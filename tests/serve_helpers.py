"""Shared by the serving tests: an in-process instance's overrides, decoding answers, metrics."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

INSTANCE = ["model=tiny_random", "launcher.threads_per_rank=1", "serve.instance.warmup=false"]


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def images_of(answer: dict[str, Any]) -> list[np.ndarray]:
    return [decoded(base64.b64decode(d["b64_json"])) for d in answer["data"]]


def counter(app: Any, name: str) -> float:
    """A metric's value (summed over labels) from the app's engine registry."""
    registry = app.state.engine.metrics.registry
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)
