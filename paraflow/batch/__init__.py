"""Batch jobs: many thousands of rows (prompt, seed, size, ...) from a JSONL, CSV or Parquet file
into images and one Parquet manifest, resumable, spread over the ranks of a machine and over
machines (SLURM job arrays, Kubernetes Indexed Jobs). `python -m paraflow.batch --help`.

    rows.py   reading and checking the rows, before any rank starts
    store.py  the output folder: images, the manifest's parts (one per chunk), the merge
    job.py    a shard of the rows through one Session on every rank of the group
"""
