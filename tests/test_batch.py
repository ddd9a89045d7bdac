"""Batch jobs (python -m paraflow.batch): rows checked before any rank starts; a 200-row job on
2 `data` ranks killed with SIGKILL mid-way and resumed makes every row exactly once, with the
images of an uninterrupted one-device job (batches of 2 in both, but spawned ranks against one
process: within 1 grey level, not asserted bit-equal); the same rows as two SLURM array tasks
and a merge give the same images (one device each: bit-equal) and one manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from paraflow.api import compose
from paraflow.batch.job import shard_of
from paraflow.batch.rows import check_rows, read_records
from paraflow.errors import ParaflowError
from tests.conftest import REPO

RUN = ["height=32", "width=32", "steps=2", "pipeline.max_batch=2", "pipeline.progress=false",
       "launcher.threads_per_rank=1"]
SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "blue", "green", "white", "yellow"]


def rows_file(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            row = {"prompt": f"a {COLOURS[i % 5]} {SHAPES[i % 4]}", "id": f"r{i}"}
            if i % 3 == 0:
                row["seed"] = 1000 + i
            f.write(json.dumps(row) + "\n")
    return path


def batch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "paraflow.batch", *RUN, *args], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finished(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}


def manifest(out: Path) -> pa.Table:
    return pq.read_table(out / "manifest.parquet")


# --- rows, before any rank -------------------------------------------------------------------

def test_rows_from_jsonl_csv_and_parquet_are_the_same_rows(tmp_path: Path) -> None:
    records = [{"prompt": "a red circle", "seed": 3, "steps": 4}, {"prompt": "a blue square"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pa.Table.from_pylist(records)
    pacsv.write_csv(table, tmp_path / "r.csv")
    pq.write_table(table, tmp_path / "r.parquet")
    cfg = compose(RUN)
    got = {suffix: check_rows(read_records(tmp_path / f"r.{suffix}"), cfg, "r", False)[0]
           for suffix in ("jsonl", "csv", "parquet")}
    for rows in got.values():
        assert [(r.fields["prompt"], r.seed, r.fields.get("steps")) for r in rows] == \
            [("a red circle", 3, 4), ("a blue square", 1, None)]  # seed: cfg.seed 0 + row 1


@pytest.mark.parametrize(("line", "needle"), [
    ('{"prompt": "a", "stpes": 3}', "line 2: unknown field 'stpes' (allowed: prompt,"),
    ('{"prompt": "a", "steps": "many"}', "line 2: steps='many': must be an integer"),
    ('{"seed": 4}', "line 2: prompt: missing"),
    ('{"prompt": "a", "height": 34}', "line 2: height=34: must be a positive multiple of 4"),
    ('{"prompt": "a", "image": "/no/such.png"}', "line 2: image=/no/such.png: no such file"),
    ('not json', "line 2: not JSON"),
])
def test_a_bad_row_is_named_by_its_line_and_field(tmp_path: Path, line: str,
                                                 needle: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ParaflowError, match="rows.jsonl " + needle.replace("(", r"\(")):
        check_rows(read_records(path), compose(RUN), "rows.jsonl", False)


def test_bad_rows_are_skipped_and_listed_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 0}\n{"prompt": "c"}\n')
    rows, bad = check_rows(read_records(path), compose(RUN), "rows.jsonl", True)
    assert [r.fields["prompt"] for r in rows] == ["a", "c"]
    assert bad == [{"line": 2, "error": "steps=0: must be at least 1"}]


def test_shards_come_from_slurm_arrays_and_indexed_jobs() -> None:
    assert shard_of({}) == (0, 1)
    assert shard_of({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert shard_of({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                     "SLURM_ARRAY_TASK_MAX": "7"}) == (1, 4)
    assert shard_of({"JOB_COMPLETION_INDEX": "2"}, shards=3) == (2, 3)
    with pytest.raises(ParaflowError, match="pass shards=N"):
        shard_of({"JOB_COMPLETION_INDEX": "2"})
    with pytest.raises(ParaflowError, match="shard=4: must be in 0..3"):
        shard_of({}, 4, 4)


# --- whole jobs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 200 rows in one go on one device: (rows file, output)."""
    root = tmp_path_factory.mktemp("batch")
    rows = rows_file(root / "rows.jsonl", 200)
    out = root / "one"
    print(finished(batch(f"input={rows}", f"output_dir={out}")))
    return rows, out


@pytest.mark.slow
def test_a_killed_job_resumes_and_makes_every_row_once(uninterrupted: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    rows, one = uninterrupted
    out = tmp_path / "two"
    args = [f"input={rows}", f"output_dir={out}", "+strategy=data", "launcher.devices=2"]
    first = batch(*args)
    deadline = time.monotonic() + 300
    while len(list((out / "parts").glob("*.parquet"))) < 10:  # 10 of 50 chunks written
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    parts_then = len(list((out / "parts").glob("*.parquet")))
    assert parts_then < 50 and not (out / "manifest.parquet").exists()
    summary = finished(batch(*args))
    print(f"killed after {parts_then} of 50 chunks; resumed:", summary)
    done_before = int(summary.split(" already done")[0].rsplit(", ", 1)[-1])
    assert done_before >= parts_then * 4 and f"{200 - done_before} images made" in summary
    table = manifest(out)
    assert table.column("row").to_pylist() == list(range(200))  # each row exactly once
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(200)]
    assert set(table.column("rank").to_pylist()) == {0, 1}
    got, want = images(out), images(one)
    assert sorted(got) == sorted(want) and len(got) == 200
    worst = max(int(np.abs(got[k].astype(int) - want[k].astype(int)).max()) for k in want)
    print(f"2 data ranks (killed, resumed) against one device: worst pixel diff {worst}")
    assert worst <= 1
    again = finished(batch(*args))  # nothing left: nothing launched, nothing rewritten
    assert "0 images made, 200 already done" in again


@pytest.mark.slow
def test_two_array_tasks_and_a_merge_give_the_same_images(uninterrupted: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    rows, one = uninterrupted
    out = tmp_path / "array"
    tasks = [batch(f"input={rows}", f"output_dir={out}",
                   env={"SLURM_ARRAY_TASK_ID": str(k), "SLURM_ARRAY_TASK_COUNT": "2"})
             for k in range(2)]
    outputs = [finished(t) for t in tasks]
    assert sum("manifest.parquet holds all 200 rows" in o for o in outputs) >= 1  # the last
    (out / "manifest.parquet").unlink()
    merged = subprocess.run([sys.executable, "-m", "paraflow.batch", "merge",
                             f"output_dir={out}"], cwd=REPO, text=True, capture_output=True,
                            timeout=120)
    assert merged.returncode == 0 and "200 rows" in merged.stdout, merged.stderr
    table = manifest(out)
    assert table.column("row").to_pylist() == list(range(200))
    assert sorted(set(table.column("shard").to_pylist())) == [0, 1]
    got, want = images(out), images(one)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)  # the same path: one device each


@pytest.mark.parametrize("pipeline", ["img2img", "inpaint"])
def test_edit_rows_equal_runs_of_each_row_alone(pipeline: str, tmp_path: Path) -> None:
    """Rows with their own image, strength (and mask, inpainting) on one device, batches of 1:
    each image equal, bit for bit (the same path), to `generate` of that row alone."""
    from paraflow.api import generate
    from paraflow.batch.job import run_batch
    from tests.test_pipelines import input_image, mask_image

    inputs = [input_image(tmp_path / f"in{i}.png", i, (32, 32)) for i in range(3)]
    masks = [mask_image(tmp_path / "mask.png", (32, 32))] * 3 if pipeline == "inpaint" else []
    records: list[dict[str, Any]] = [
        {"prompt": "a red circle", "image": str(inputs[0]), "strength": 0.6, "seed": 5},
        {"prompt": "a blue square", "image": str(inputs[1]), "strength": 0.9},
        {"prompt": "a green triangle", "image": str(inputs[2]), "strength": 0.6}]
    for record, mask in zip(records, masks):
        record["mask"] = str(mask)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in records))
    edit = [*RUN, f"pipeline={pipeline}", "pipeline.max_batch=1", "steps=4"]
    summary = run_batch(compose([*edit, f"output_dir={tmp_path / 'job'}"]), rows)
    assert summary.made == 3 and summary.manifest_rows == 3
    table = manifest(tmp_path / "job")
    assert table.column("strength").to_pylist() == [0.6, 0.9, 0.6]
    assert table.column("seed").to_pylist() == [5, 1, 2]  # given, else seed 0 + the row
    assert table.column("mask").to_pylist() == ([str(m) for m in masks] or [None] * 3)
    got = images(tmp_path / "job")
    for i, record in enumerate(records):
        seed = record.get("seed", i)
        keys = [f"{k}={record[k]}" for k in ("prompt", "image", "strength", "mask")
                if k in record]
        alone = generate(compose([*edit, *keys, f"seed={seed}"]), tmp_path / f"alone{i}")
        want = np.asarray(Image.open(tmp_path / f"alone{i}" / alone["images"][0]))
        assert np.array_equal(got[f"{i:07d}.png"], want), i


def test_latents_per_row_and_webdataset_shards_hold_the_manifest_s_rows(tmp_path: Path) -> None:
    """save_latents=true writes each row's final latents; webdataset=3 turns the merged rows
    into tar shards of 3 samples that webdataset itself reads back: each sample's image, latents
    and manifest row are the row's own files."""
    import webdataset as wds
    from safetensors.torch import load_file

    from paraflow.batch.__main__ import main

    out = tmp_path / "job"
    code = main([f"input={rows_file(tmp_path / 'rows.jsonl', 7)}", f"output_dir={out}",
                 "webdataset=3", "save_latents=true", *RUN])
    assert code == 0
    table = manifest(out).to_pylist()
    assert [r["latents"] for r in table] == [f"latents/{i:07d}.safetensors" for i in range(7)]
    shards = sorted((out / "webdataset").glob("*.tar"))
    assert [s.name for s in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:07d}" for i in range(7)]
    for sample, row in zip(samples, table):
        assert json.loads(sample["json"]) == json.loads(json.dumps(row))
        assert sample["png"] == (out / row["file"]).read_bytes()
        latents = load_file(str(out / row["latents"]))["latents"]
        assert latents.shape == (4, 8, 8)  # 32² through the tiny VAE's 4× downsampling
        assert sample["latents.safetensors"] == (out / row["latents"]).read_bytes()
    assert main(["merge", f"output_dir={out}", "webdataset=7"]) == 0  # one shard now
    assert [s.name for s in sorted((out / "webdataset").glob("*.tar"))] == ["000000.tar"]
