"""A job (one checked request) and what goes wrong with one: cancelled, or no room to wait."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from paraflow.serve.requests import EditRequest, ImagesRequest


class Cancelled(Exception):
    """The client went away or cancelled: the job stops at the next step."""


class Busy(Exception):
    """The instance's queue is full (answered 429)."""


@dataclass(frozen=True)
class Uploads:
    """An edit's files as uploaded and checked (uploads.py): the image, and the mask of an
    inpainting edit."""

    image: bytes
    mask: bytes | None = None

    @contextlib.contextmanager
    def written(self) -> Iterator[dict[str, str]]:
        """The files in a folder of their own, by run key (image, mask), removed on the way
        out however the job ends; the stages open them as a run opens its `image=PATH`."""
        with tempfile.TemporaryDirectory(prefix="paraflow-edit-") as folder:
            paths = {}
            for key, data in (("image", self.image), ("mask", self.mask)):
                if data is not None:
                    (Path(folder) / key).write_bytes(data)
                    paths[key] = str(Path(folder) / key)
            yield paths


@dataclass
class Job:
    request: ImagesRequest  # an EditRequest where uploads are given
    width: int
    height: int
    seed: int  # image i of the job starts from the noise of seed + i
    on_progress: Callable[[dict[str, Any]], None] | None = None
    uploads: Uploads | None = None  # an edit's (img2img, or inpaint with a mask)
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future[list[bytes]] = field(
        default_factory=concurrent.futures.Future)
    accepted: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: secrets.token_hex(8))

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys run as one batch: everything but the prompt, seed and n (the
        same adapters at the same scales, too: they are switched per batch). An
        edit runs alone (its own image, mask and strength): its key holds its id."""
        r = self.request
        return (self.width, self.height, r.steps, r.guidance_scale, r.scheduler,
                r.negative_prompt, tuple((c.name, c.scale) for c in r.lora),
                self.id if self.uploads is not None else None)

    def inputs(self) -> contextlib.AbstractContextManager[dict[str, str]]:
        """The job's input files by run key while it runs ({} for a generation)."""
        return self.uploads.written() if self.uploads is not None else contextlib.nullcontext({})

    def spec(self) -> dict[str, Any]:
        """What a peer rank needs to run the job (group.py): an edit's files too."""
        uploads = None if self.uploads is None else {"image": self.uploads.image,
                                                     "mask": self.uploads.mask}
        return {"request": self.request.model_dump(), "width": self.width,
                "height": self.height, "seed": self.seed, "uploads": uploads, "id": self.id}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Job:
        uploads = spec.get("uploads")
        kind = ImagesRequest if uploads is None else EditRequest
        return cls(kind(**spec["request"]), spec["width"], spec["height"], spec["seed"],
                   uploads=None if uploads is None else Uploads(**uploads), id=spec["id"])


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def new_seed() -> int:
    return secrets.randbelow(2**31)
