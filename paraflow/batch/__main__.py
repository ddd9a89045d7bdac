"""python -m paraflow.batch input=ROWS output_dir=DIR [on_bad_row=skip] [shard=K shards=N]
[cost.device_hour=PRICE] [webdataset=N] [save_latents=true]
[any run override: +strategy=..., launcher.devices=N, steps=...]
python -m paraflow.batch merge output_dir=DIR [webdataset=N]

ROWS: a .jsonl, .csv or .parquet file, one image per row: prompt (required), negative_prompt,
seed, height, width, steps, guidance_scale, strength, image, mask, id. Rerun the same command to
resume; under a SLURM job array or a Kubernetes Indexed Job each task makes its shard of the rows,
and the last to finish (or `merge`) writes DIR/manifest.parquet (and with webdataset=N, the images
as WebDataset tar shards of N samples in DIR/webdataset/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

OWN = ("input", "on_bad_row", "shard", "shards", "cost.device_hour", "webdataset")


def main(argv: list[str]) -> int:
    from paraflow.errors import ParaflowError, RankFailed

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    merging = argv[0] == "merge"
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in OWN}
    rest = [a for a in argv[1 if merging else 0:] if a.split("=", 1)[0] not in OWN]
    try:
        webdataset = int(own["webdataset"]) if "webdataset" in own else None
        if webdataset is not None and webdataset < 1:
            raise ParaflowError(f"webdataset={webdataset}: samples per shard, at least 1")
        if merging:
            from paraflow.batch.store import merge

            out = next((a.split("=", 1)[1] for a in rest if a.startswith("output_dir=")), None)
            if out is None:
                raise ParaflowError("merge: pass output_dir=DIR")
            print(f"batch: manifest.parquet holds {merge(Path(out), webdataset)} rows")
            return 0
        from paraflow.api import compose
        from paraflow.batch.job import run_batch

        if "input" not in own:
            raise ParaflowError("input=ROWS is missing (a .jsonl, .csv or .parquet file)")
        if own.get("on_bad_row", "fail") not in ("fail", "skip"):
            raise ParaflowError(f"on_bad_row={own['on_bad_row']}: must be fail or skip")
        cfg = compose(rest)
        if not cfg.output_dir:
            raise ParaflowError("output_dir=DIR is missing")
        summary = run_batch(
            cfg, Path(own["input"]), own.get("on_bad_row") == "skip",
            int(own["shard"]) if "shard" in own else None,
            int(own["shards"]) if "shards" in own else None,
            float(own["cost.device_hour"]) if "cost.device_hour" in own else None, webdataset)
    except (ParaflowError, RankFailed) as err:
        print(f"paraflow.batch: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParaflowError) else 1
    print(summary.lines())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
