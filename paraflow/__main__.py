"""`python -m paraflow [hydra overrides]`: one generation run (or a `-m` sweep of them)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-backend notices

import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from paraflow.config import register_configs
from paraflow.errors import ParaflowError, RankFailed


def _rank_started_outside() -> int | None:
    """This process's global rank if torchrun or SLURM started it (as Fabric and
    paraflow.launcher.processes_created_externally decide), else None. From the environment
    alone: torch is not imported yet."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ.get("RANK", "0"))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and \
            os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(os.environ.get("SLURM_PROCID", "0"))
    return None


def _remove_if_only_hydra(run_dir: Path) -> None:
    """A refused run leaves nothing: drop the folder Hydra made if it holds only its own files."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _print_plan(cfg: DictConfig, hydra_dir: Path) -> None:
    """plan_only=true: the per-rank memory and communication plan, as plan.md (the table, also
    printed) and plan.json in the run folder (output_dir, or Hydra's); nothing is launched or
    loaded (paraflow/plan)."""
    import json

    from paraflow.plan import make_plan

    if _rank_started_outside() not in (None, 0):
        return  # under torchrun or SLURM, rank 0 alone plans
    run_dir = Path(cfg.output_dir) if cfg.output_dir else hydra_dir
    try:
        plan = make_plan(cfg)
    except ParaflowError as err:
        _remove_if_only_hydra(hydra_dir)
        print(f"paraflow: error: {err}", file=sys.stderr)
        sys.exit(2)
    if run_dir != hydra_dir:
        _remove_if_only_hydra(hydra_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = plan.markdown()
    files = {"plan.md": table + "\n", "plan.json": json.dumps(plan.to_dict(), indent=2)}
    for name, text in files.items():
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)  # whole or not at all
    print(table)
    print(f"plan written to {run_dir / 'plan.md'} and {run_dir / 'plan.json'}")


@hydra.main(config_path="pkg://paraflow.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Imported here so that a config Hydra refuses fails fast, before torch and diffusers load.
    from paraflow.api import generate

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.plan_only:
        _print_plan(cfg, hydra_dir)
        return
    try:
        result = generate(cfg, cfg.output_dir or hydra_dir)
    except ParaflowError as err:
        _remove_if_only_hydra(hydra_dir)
        print(f"paraflow: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RankFailed as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # the traceback, with the rank's own below "The above exception was..."
        print(f"paraflow: error: {err}", file=sys.stderr)
        sys.exit(1)
    if _rank_started_outside() in (None, 0):
        print(f"{result['n_images']} image(s) in {result['latency_s']:.2f}s "
              f"({result['strategy']}, {result['world_size']} rank(s)) -> {result['output_dir']}")


if __name__ == "__main__":
    register_configs()
    _rank = _rank_started_outside()
    if _rank:
        # Ranks after 0 under torchrun/SLURM run Hydra too, but rank 0's folder is the run's
        # (paraflow.launcher): theirs is a private one, without .hydra, removed at the end.
        _private = tempfile.mkdtemp(prefix=f"paraflow-rank{_rank}-")
        sys.argv += [f"hydra.run.dir={_private}", f"hydra.sweep.dir={_private}",
                     "hydra.output_subdir=null"]
        try:
            main()
        finally:
            shutil.rmtree(_private, ignore_errors=True)
    else:
        main()
