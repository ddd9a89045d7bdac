"""`python -m paraflow [hydra overrides]`: one generation run (or a `-m` sweep of them)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet optional-backend notices

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from paraflow.config import register_configs
from paraflow.errors import ParaflowError


def _remove_if_only_hydra(run_dir: Path) -> None:
    """A refused run leaves nothing: drop the folder Hydra made if it holds only its own files."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _print_plan(cfg: DictConfig, hydra_dir: Path) -> None:
    """plan_only=true: the per-rank memory and communication plan (markdown, then one JSON line);
    nothing is launched or loaded (paraflow/plan)."""
    import json

    from paraflow.plan import make_plan

    try:
        plan = make_plan(cfg)
    except ParaflowError as err:
        print(f"paraflow: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        _remove_if_only_hydra(hydra_dir)
    print(plan.markdown())
    print(json.dumps(plan.to_dict()))


@hydra.main(config_path="pkg://paraflow.conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Imported here so that a config Hydra refuses fails fast, before torch and diffusers load.
    from torch.multiprocessing import ProcessRaisedException

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
    except ProcessRaisedException as err:
        print(f"paraflow: a rank failed, run stopped:\n{err}", file=sys.stderr)
        sys.exit(1)
    print(f"{result['n_images']} image(s) in {result['latency_s']:.2f}s "
          f"({result['strategy']}, {result['world_size']} rank(s)) -> {result['output_dir']}")


if __name__ == "__main__":
    register_configs()
    main()
