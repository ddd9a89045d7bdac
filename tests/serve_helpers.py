"""Shared by the serving tests: an in-process instance's overrides, one served over HTTP,
pictures to upload, decoding answers, metrics."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from paraflow.api import compose, generate
from tests.conftest import read_images

# What an instance computes with. A run compared with it bit for bit takes the same thread
# count: CPU kernels (oneDNN's 1x1 convolutions among them) split their sums by thread, so a
# run on cpu_count threads lands ~1e-5 off in the latents, sometimes 1 grey level in a pixel.
COMPUTE = ["model=tiny_random", "launcher.threads_per_rank=1"]
# Uploads above 64 KiB are refused here, so a test can cross the limit with a small image.
INSTANCE = [*COMPUTE, "serve.instance.warmup=false", "serve.limits.max_upload_bytes=65536"]


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def images_of(answer: dict[str, Any]) -> list[np.ndarray]:
    return [decoded(base64.b64decode(d["b64_json"])) for d in answer["data"]]


def counter(app: Any, name: str) -> float:
    """A metric's value (summed over labels) from the app's engine registry."""
    registry = app.state.engine.metrics.registry
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


def picture(width: int = 64, height: int = 64, noise: bool = False) -> bytes:
    """A PNG to upload: a gradient with a disc, or noise (which PNG cannot compress)."""
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        y, x = np.mgrid[0:height, 0:width]
        disc = (x - width / 3) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2
        pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                           np.where(disc, 255, 40)], axis=-1).astype(np.uint8)
    return encoded(Image.fromarray(pixels))


def square_mask(width: int = 64, height: int = 64, transparent: bool = False) -> bytes:
    """White (repaint) in the middle square, black (keep) around it; `transparent`: OpenAI's
    kind of the same mask, transparent where it repaints."""
    inside = np.zeros((height, width), dtype=bool)
    inside[height // 4:3 * height // 4, width // 4:3 * width // 4] = True
    if transparent:
        alpha = np.where(inside, 0, 255).astype(np.uint8)
        grey = np.full((height, width, 3), 90, dtype=np.uint8)
        return encoded(Image.fromarray(np.dstack([grey, alpha])))
    return encoded(Image.fromarray(np.where(inside, 255, 0).astype(np.uint8)))


def encoded(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` served over HTTP on a free loopback port (uvicorn on a thread, as an instance
    serves it): its base URL."""
    import uvicorn

    from paraflow.serve.local import free_ports

    port = free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def served_lora(adapters: dict[str, Path]) -> str:
    return "serve.lora=[" + ",".join(f"{{name:{n},path:'{p}'}}" for n, p in adapters.items()) \
        + "]"


def run_alone(tmp_path: Path, loras: list[tuple[Path, float]], seed: int) -> np.ndarray:
    """`python -m paraflow` with just these LoRAs loaded (model.lora), the requests' settings."""
    arg = "model.lora=[" + ",".join(f"{{path:'{p}',scale:{s}}}" for p, s in loras) + "]"
    out = tmp_path / f"run-{seed}"
    generate(compose([*COMPUTE, *([arg] if loras else []), "prompt=a red circle", "steps=3",
                      f"seed={seed}", "pipeline.progress=false"]), out)
    return read_images(out)[0]
