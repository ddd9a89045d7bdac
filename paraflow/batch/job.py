"""A batch job: its rows checked, this shard's rows that are not done yet grouped into chunks
(rows that share size, steps, guidance, ... and fit one pass of every rank), then one launch in
which every rank builds its Session once and generates chunk after chunk; rank 0 writes each
chunk's images and then its manifest part."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import save_file

from paraflow.batch.rows import Row, check_rows, read_records, row_config
from paraflow.batch.store import (
    atomic_write,
    done_rows,
    image_name,
    latents_name,
    merge,
    write_bad_rows,
    write_part,
)
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError


def shard_of(environ: Mapping[str, str], shard: int | None = None,
             shards: int | None = None) -> tuple[int, int]:
    """(this shard, how many): given, else from a SLURM job array (SLURM_ARRAY_TASK_ID and
    _COUNT, or _MIN/_MAX), else a Kubernetes Indexed Job's JOB_COMPLETION_INDEX (with `shards`
    given), else (0, 1). Row i belongs to shard i mod shards."""
    if shard is None and "SLURM_ARRAY_TASK_ID" in environ:
        low = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        shard = int(environ["SLURM_ARRAY_TASK_ID"]) - low
        if shards is None:
            count = environ.get("SLURM_ARRAY_TASK_COUNT")
            shards = int(count) if count else int(environ["SLURM_ARRAY_TASK_MAX"]) - low + 1
    elif shard is None and "JOB_COMPLETION_INDEX" in environ:
        shard = int(environ["JOB_COMPLETION_INDEX"])
        if shards is None:
            raise ParaflowError("JOB_COMPLETION_INDEX is set: pass shards=N (the Indexed Job's "
                                "completions)")
    shard, shards = shard or 0, shards or 1
    if not 0 <= shard < shards:
        raise ParaflowError(f"shard={shard}: must be in 0..{shards - 1} (shards={shards})")
    return shard, shards


def config_hash(cfg: DictConfig) -> str:
    """The run config's identity, per-row keys aside (the manifest's config_hash)."""
    keys = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()  # type: ignore[union-attr]
            if k not in ("prompt", "output_dir", "seed")}
    return hashlib.sha256(repr(sorted(keys.items())).encode()).hexdigest()[:12]


def chunks_of(rows: list[Row], cfg: DictConfig, size: int) -> list[list[Row]]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group(cfg), []).append(row)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def _manifest_row(row: Row, cfg: DictConfig, rank: int, seconds: float, shard: int,
                  digest: str) -> dict[str, Any]:
    f = row.fields
    return {"row": row.index, "line": row.line, "id": f.get("id"), "prompt": f["prompt"],
            "negative_prompt": f.get("negative_prompt", cfg.negative_prompt),
            "seed": row.seed, "height": int(f.get("height", cfg.height)),
            "width": int(f.get("width", cfg.width)), "steps": int(f.get("steps", cfg.steps)),
            "guidance_scale": float(f.get("guidance_scale", cfg.guidance_scale)),
            "strength": f.get("strength", cfg.strength), "image": f.get("image"),
            "mask": f.get("mask"), "file": image_name(row.index),
            "latents": latents_name(row.index) if cfg.save_latents else None, "seconds": seconds,
            "rank": rank, "shard": shard, "config_hash": digest}


def batch_on_rank(ctx: ParallelContext, cfg: DictConfig, chunks: list[list[Row]], shard: int,
                  digest: str) -> dict[str, Any]:
    """Every rank: one Session, every chunk through it; rank 0 writes. Returns the seconds spent
    generating and the images made."""
    from tqdm import tqdm

    from paraflow.session import Session
    from paraflow.stages.latents import SEEDS

    out = Path(cfg.output_dir)
    session = Session(ctx, cfg)
    total = sum(len(c) for c in chunks)
    bar = tqdm(total=total, unit="img", disable=not (ctx.is_main and cfg.pipeline.progress),
               dynamic_ncols=True)
    generating = 0.0
    for chunk in chunks:
        run = row_config(cfg, chunk)
        start = time.perf_counter()
        made = session.generate(run, list(run.prompt), keep_latents=bool(cfg.save_latents),
                                services={SEEDS: {i: r.seed for i, r in enumerate(chunk)}})
        seconds = time.perf_counter() - start
        generating += seconds
        owners = ctx.comm.gather_objects(made.image_ids)
        if ctx.is_main:
            rank_of = {i: rank for rank, ids in reversed(list(enumerate(owners))) for i in ids}
            for i, row in enumerate(chunk):
                pixels = made.sink.images[i]
                atomic_write(out / image_name(row.index),
                             lambda tmp, p=pixels: Image.fromarray(p).save(tmp, format="PNG"))
                if cfg.save_latents:
                    latents = {"latents": made.sink.latents[i].contiguous()}
                    atomic_write(out / latents_name(row.index),
                                 lambda tmp, t=latents: save_file(t, tmp))
            write_part(out, shard, [_manifest_row(r, cfg, rank_of.get(i, 0),
                                                  seconds / len(chunk), shard, digest)
                                    for i, r in enumerate(chunk)])
        bar.update(len(chunk))
    bar.close()
    return {"images": total, "generating_s": generating}


@dataclass
class Summary:
    rows: int  # valid rows of the whole input
    bad_rows: int
    shard: int
    shards: int
    done_before: int  # this shard's rows already done when it started
    made: int
    wall_s: float
    generating_s: float
    devices: int
    manifest_rows: int | None  # written when every valid row is done
    cost_per_image: float | None

    def lines(self) -> str:
        rate = self.made / self.wall_s if self.wall_s else 0.0
        text = (f"batch: shard {self.shard}/{self.shards}: {self.made} images made, "
                f"{self.done_before} already done, {self.bad_rows} bad rows skipped; "
                f"{self.wall_s:.1f} s, {rate:.2f} images/s on {self.devices} device(s)")
        if self.generating_s:  # without the launch and the model loading
            text += f" ({self.made / self.generating_s:.2f} images/s generating)"
        if self.cost_per_image is not None:
            text += f"; {self.cost_per_image:.6f} per image"
        if self.manifest_rows is not None:
            text += f"\nbatch: manifest.parquet holds all {self.manifest_rows} rows"
        return text


def run_batch(cfg: DictConfig, source: Path, skip_bad: bool = False, shard: int | None = None,
              shards: int | None = None, device_hour: float | None = None,
              webdataset: int | None = None) -> Summary:
    from paraflow.launcher import launch

    out = Path(cfg.output_dir)
    # No check of `cfg` alone: its image, size, ... come from the rows, which check_rows
    # validates as runs, one per group of rows that share them.
    shard, shards = shard_of(os.environ, shard, shards)
    devices = int(cfg.launcher.devices) * int(cfg.launcher.num_nodes)
    chunk = int(cfg.pipeline.max_batch) * devices  # a pass of every rank
    rows, bad = check_rows(read_records(source), cfg, source.name, skip_bad, chunk)
    out.mkdir(parents=True, exist_ok=True)
    if bad:
        write_bad_rows(out, bad)
    mine = [r for r in rows if r.index % shards == shard]
    done = done_rows(out)
    todo = [r for r in mine if r.index not in done]
    start = time.perf_counter()
    result: dict[str, Any] = {"images": 0, "generating_s": 0.0}
    if todo:
        chunks = chunks_of(todo, cfg, chunk)
        result = launch(cfg, partial(batch_on_rank, chunks=chunks, shard=shard,
                                     digest=config_hash(cfg)), explain=True)
    wall = time.perf_counter() - start
    finished = {r.index for r in rows} <= done_rows(out)
    cost = None
    if device_hour is not None and result["images"]:
        cost = device_hour * devices * wall / 3600 / result["images"]
    manifest = merge(out, webdataset) if finished else None
    return Summary(len(rows), len(bad), shard, shards, len(mine) - len(todo), result["images"],
                   wall, result["generating_s"], devices, manifest, cost)
