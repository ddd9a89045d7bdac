"""A job (one checked request) and what goes wrong with one: cancelled, or no room to wait."""

from __future__ import annotations

import concurrent.futures
import io
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from paraflow.serve.requests import ImagesRequest


class Cancelled(Exception):
    """The client went away or cancelled: the job stops at the next step."""


class Busy(Exception):
    """The instance's queue is full (answered 429)."""


@dataclass
class Job:
    request: ImagesRequest
    width: int
    height: int
    seed: int  # image i of the job starts from the noise of seed + i
    on_progress: Callable[[dict[str, Any]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future[list[bytes]] = field(
        default_factory=concurrent.futures.Future)
    accepted: float = field(default_factory=time.perf_counter)

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys run as one batch: everything but the prompt, seed and n."""
        r = self.request
        return (self.width, self.height, r.steps, r.guidance_scale, r.scheduler,
                r.negative_prompt)

    def spec(self) -> dict[str, Any]:
        """What a peer rank needs to run the job (group.py)."""
        return {"request": self.request.model_dump(), "width": self.width,
                "height": self.height, "seed": self.seed}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Job:
        return cls(ImagesRequest(**spec["request"]), spec["width"], spec["height"],
                   spec["seed"])


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def new_seed() -> int:
    return secrets.randbelow(2**31)
