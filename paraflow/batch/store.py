"""A batch job's output folder, written so that a killed job leaves nothing half-written:

    images/NNNNNNN.png          one per row, named by the row's position in the input
    latents/NNNNNNN.safetensors its final latents, with save_latents=true
    parts/SHARD-FIRSTROW.parquet the manifest rows of one chunk, written after its images
    manifest.parquet            every part merged, sorted by row (`merge`, or the last shard)
    webdataset/NNNNNN.tar       with webdataset=N: the merged rows as WebDataset shards of N
                                samples (key NNNNNNN: .png, .json = its manifest row, and
                                .latents.safetensors), for training pipelines that read them
    bad_rows.jsonl              rows left out with on_bad_row=skip, with why

Every file is written to a temporary name and renamed. A row is done when a part lists it: a
resumed job skips those, and remakes (the same image, by its seed) any row whose image was
written but whose part was not.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paraflow import outputs

SCHEMA = pa.schema([
    ("row", pa.int64()), ("line", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("height", pa.int64()),
    ("width", pa.int64()), ("steps", pa.int64()), ("guidance_scale", pa.float64()),
    ("strength", pa.float64()), ("image", pa.string()), ("mask", pa.string()),
    ("file", pa.string()), ("latents", pa.string()), ("seconds", pa.float64()),
    ("rank", pa.int64()), ("shard", pa.int64()), ("config_hash", pa.string()),
])


def atomic_write(path: Path, write: Any) -> None:
    """write(temporary path), then rename it onto `path` (its folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write(path, write)


def image_name(row: int) -> str:
    return f"images/{row:07d}.png"


def latents_name(row: int) -> str:
    return f"latents/{row:07d}.safetensors"


def write_part(out: Path, shard: int, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    first = min(r["row"] for r in rows)
    atomic_write(out / "parts" / f"{shard:04d}-{first:07d}.parquet",
                 lambda tmp: pq.write_table(table, tmp))


def parts(out: Path) -> pa.Table:
    files = sorted((out / "parts").glob("*.parquet"))
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])


def done_rows(out: Path) -> set[int]:
    return set(parts(out).column("row").to_pylist())


def merge(out: Path, webdataset: int | None = None) -> int:
    """Every part into manifest.parquet, sorted by row (and into WebDataset shards of
    `webdataset` samples); the number of rows."""
    table = parts(out).sort_by("row")
    atomic_write(out / "manifest.parquet", lambda tmp: pq.write_table(table, tmp))
    if webdataset:
        write_webdataset(out, table.to_pylist(), webdataset)
    return table.num_rows


def write_webdataset(out: Path, rows: list[dict[str, Any]], per_shard: int) -> None:
    """The rows' files as tar shards (webdataset's TarWriter: its key and file-name rules),
    each written whole under a temporary name; shards of an earlier, shorter merge beyond the
    new count are removed."""
    import webdataset as wds

    def write(tmp: str, samples: list[dict[str, Any]]) -> None:
        with open(tmp, "wb") as handle, wds.TarWriter(handle, mtime=0) as tar:
            for row in samples:
                sample = {"__key__": Path(row["file"]).stem, "json": row,
                          "png": (out / row["file"]).read_bytes()}
                if row.get("latents"):
                    sample["latents.safetensors"] = (out / row["latents"]).read_bytes()
                tar.write(sample)

    count = -(-len(rows) // per_shard)
    for index in range(count):
        atomic_write(out / "webdataset" / f"{index:06d}.tar",
                     partial(write, samples=rows[index * per_shard:(index + 1) * per_shard]))
    for stale in sorted((out / "webdataset").glob("*.tar"))[count:]:
        stale.unlink()


def write_bad_rows(out: Path, bad: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(b) + "\n" for b in bad)
    atomic_write(out / "bad_rows.jsonl", lambda tmp: Path(tmp).write_text(text))
