"""Run outputs: images/NNNN.png, run.json, latents.safetensors. Written whole or not at all.

Images go to a hidden staging folder (each file written then renamed), which becomes `images/`
in one rename once all are there; run.json is written last. A run dir that already holds a run is
refused, so nothing earlier is overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from paraflow.errors import ParaflowError

if TYPE_CHECKING:
    from paraflow.comm import Communicator

RESULT_NAMES = ("images", "run.json", "latents.safetensors")


@dataclass
class OutputSink:
    """The images (and latents) this rank made, keyed by global image index. The shapes let a
    rank that made no image still take part in a gather."""

    image_shape: tuple[int, ...] = (0, 0, 3)
    latent_shape: tuple[int, ...] = (0, 0, 0)
    keep_latents: bool = False
    images: dict[int, np.ndarray] = field(default_factory=dict)
    latents: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, ids: list[int], images: np.ndarray, latents: torch.Tensor | None) -> None:
        for row, image_id in enumerate(ids):
            self.images[image_id] = images[row]
            if latents is not None:
                self.latents[image_id] = latents[row]

    def stacked_images(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros((0, *self.image_shape), dtype=np.uint8)
        return np.stack([self.images[i] for i in ids])

    def stacked_latents(self, ids: list[int]) -> torch.Tensor:
        if not ids:
            return torch.zeros((0, *self.latent_shape))
        return torch.stack([self.latents[i] for i in ids])


def gather_by_index(sink: OutputSink, comm: Communicator, device: torch.device) -> OutputSink:
    """All-gather the (uneven) per-rank results over `comm`; ranks that made the same index
    agree."""
    if comm.world_size == 1:
        return sink
    ids = sorted(sink.images)
    all_ids = comm.all_gather_uneven(torch.tensor(ids, dtype=torch.int64, device=device))
    images = torch.from_numpy(sink.stacked_images(ids)).to(device)
    all_images = comm.all_gather_uneven(images)
    gathered = OutputSink(sink.image_shape, sink.latent_shape, sink.keep_latents)
    for rank_ids, rank_images in zip(all_ids, all_images):
        for row, image_id in enumerate(rank_ids.tolist()):
            gathered.images[image_id] = rank_images[row].cpu().numpy()
    if sink.keep_latents:
        lat = sink.stacked_latents(ids).to(device)
        for rank_ids, rank_lat in zip(all_ids, comm.all_gather_uneven(lat)):
            for row, image_id in enumerate(rank_ids.tolist()):
                gathered.latents[image_id] = rank_lat[row].cpu()
    return gathered


def check_output_dir(run_dir: str | Path) -> None:
    """Refuse a folder that already holds the results of a run."""
    taken = [name for name in RESULT_NAMES if (Path(run_dir) / name).exists()]
    if taken:
        raise ParaflowError(f"output_dir={run_dir} already holds a run ({', '.join(taken)}); "
                            "choose a new output_dir, nothing is overwritten")


def atomic_write(path: Path, write: Any) -> None:
    """write(a temporary path beside `path`), then rename it onto `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(run_dir: str | Path, sink: OutputSink, record: dict[str, Any]) -> list[str]:
    """Write images in index order, latents if present, then run.json. Returns image paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(run_dir)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".images."))
    try:
        names = []
        for position, image_id in enumerate(sorted(sink.images)):
            name = f"{position:04d}.png"
            Image.fromarray(sink.images[image_id]).save(staging / name)
            names.append(f"images/{name}")
        if sink.keep_latents:
            stacked = sink.stacked_latents(sorted(sink.latents)).contiguous()
            tensors = {"latents": stacked}
            if stacked.dim() == 5:  # a trajectory: (images, steps, C, h, w)
                tensors = {"latents": stacked[:, -1].clone(), "trajectory": stacked}
            atomic_write(run_dir / "latents.safetensors",
                         lambda tmp: save_file(tensors, tmp))
        staging.rename(run_dir / "images")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record = {**record, "images": names}
    atomic_write(run_dir / "run.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, default=str)))
    return names
