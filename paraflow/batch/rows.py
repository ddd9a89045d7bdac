"""The rows of a batch job: read from JSONL, CSV or Parquet (pyarrow), each checked before any
rank starts. A row is one image; its fields are the run keys it sets for that image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from paraflow.errors import ParaflowError

# field → the type it must have (after CSV's strings are read as that type)
FIELDS: dict[str, type] = {
    "prompt": str, "negative_prompt": str, "seed": int, "height": int, "width": int,
    "steps": int, "guidance_scale": float, "strength": float, "image": str, "mask": str,
    "id": str,  # the caller's own id of the row, carried into the manifest
}
# The fields that must be equal for rows to share a batch (the others are per image).
GROUP_KEYS = ("negative_prompt", "height", "width", "steps", "guidance_scale", "strength")


@dataclass(frozen=True)
class Row:
    index: int  # position in the input (0-based): the image's file name and the shard's key
    line: int  # the line (JSONL, CSV: after the header) or record number (Parquet), 1-based
    fields: dict[str, Any]
    seed: int

    def group(self, cfg: DictConfig) -> tuple[Any, ...]:
        return tuple(self.fields.get(k, cfg.get(k)) for k in GROUP_KEYS)


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The input file's records as (line, dict), in order: the line in the file (a CSV's header
    is line 1), or the record's number in a Parquet file."""
    if not path.is_file():
        raise ParaflowError(f"input={path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ParaflowError(f"{path.name} line {number}: not JSON ({err.msg})") from None
            if not isinstance(value, dict):
                raise ParaflowError(f"{path.name} line {number}: a row must be a JSON object")
            records.append((number, value))
        return records
    if suffix in (".csv", ".parquet"):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pacsv.read_csv(path) if suffix == ".csv" else pq.read_table(path)
        first = 2 if suffix == ".csv" else 1
        return [(first + i, {k: v for k, v in r.items() if v is not None})
                for i, r in enumerate(table.to_pylist())]
    raise ParaflowError(f"input={path}: {suffix or 'no suffix'} is not one of .jsonl, .csv, "
                        ".parquet")


def _typed(name: str, value: Any) -> Any:
    want = FIELDS[name]
    if want is str:
        if not isinstance(value, str) or (name == "prompt" and not value.strip()):
            kind = "a non-empty string" if name == "prompt" else "a string"
            raise ValueError(f"{name}={value!r}: must be {kind}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name}={value!r}: must be a number")
    try:
        number = want(value) if want is float else int(str(value))
    except ValueError:
        raise ValueError(f"{name}={value!r}: must be {'an integer' if want is int else 'a number'}"
                         ) from None
    return number


def parse_row(index: int, line: int, record: dict[str, Any], cfg: DictConfig) -> Row:
    """One record as a Row; ValueError naming the field when it is bad."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
    if "prompt" not in record:
        raise ValueError("prompt: missing")
    fields = {k: _typed(k, v) for k, v in record.items()}
    for path_key in ("image", "mask"):
        if path_key in fields and not Path(fields[path_key]).is_file():
            raise ValueError(f"{path_key}={fields[path_key]}: no such file")
    seed = fields.pop("seed", int(cfg.seed) + index)  # per row: the same whatever the ranks
    if seed < 0:
        raise ValueError(f"seed={seed}: must be >= 0")
    return Row(index, line, fields, seed)


def row_config(cfg: DictConfig, rows: list[Row]) -> DictConfig:
    """`cfg` with the shared keys of `rows` (one group) and their per-image inputs."""
    run = cfg.copy()
    first = rows[0].fields
    with open_dict(run):
        for key in GROUP_KEYS:
            if key in first:
                run[key] = first[key]
        run.prompt = [r.fields["prompt"] for r in rows]
        run.images_per_prompt = 1
        run.pipeline.progress = False  # the job's bar counts images, not steps
        for key in ("image", "mask"):
            if key in first:
                run[key] = [r.fields[key] for r in rows]
    return run


def check_rows(records: list[tuple[int, dict[str, Any]]], cfg: DictConfig, source: str,
               skip_bad: bool, chunk: int = 1) -> tuple[list[Row], list[dict[str, Any]]]:
    """Every record checked: its fields, then each distinct group of shared keys as a run would
    be (validate on a chunk of `chunk` such rows: sizes, steps, the strategy's rules). Bad rows
    refuse the job, naming the first one's line and field, or with `skip_bad` are left out and
    listed."""
    from paraflow.validate import validate

    rows: list[Row] = []
    bad: list[dict[str, Any]] = []
    for index, (line, record) in enumerate(records):
        try:
            rows.append(parse_row(index, line, record, cfg))
        except ValueError as err:
            bad.append({"line": line, "error": str(err)})
    checked: dict[tuple[Any, ...], str | None] = {}
    kept = []
    for row in rows:
        key = row.group(cfg)
        if key not in checked:
            try:
                validate(row_config(cfg, [row] * chunk), None)
                checked[key] = None
            except ParaflowError as err:
                checked[key] = str(err)
        if checked[key] is None:
            kept.append(row)
        else:
            bad.append({"line": row.line, "error": checked[key]})
    bad.sort(key=lambda b: int(b["line"]))
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise ParaflowError(f"{source} line {first['line']}: {first['error']}{more}; "
                            "fix it, or pass on_bad_row=skip")
    return kept, bad
