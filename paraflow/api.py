"""The Python API: compose a config as the CLI would, then run it.

    from paraflow.api import compose, generate
    cfg = compose(["+strategy=data", "launcher.devices=2", "prompt=[a,b,c]"])
    result = generate(cfg, "out/run1")   # the run.json record, plus image paths
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from paraflow.config import register_configs
from paraflow.errors import ParaflowError
from paraflow.launcher import launch
from paraflow.pool import RankPool
from paraflow.run import run_on_rank
from paraflow.validate import validate

CONF_MODULE = "paraflow.conf"  # the configs ship inside the package (conf/ in the repository)
CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The run config the CLI would compose from `overrides`. Works inside another Hydra
    application too (the benchmark is one): its global state is set aside and put back."""
    register_configs()
    outer = GlobalHydra.instance()
    previous = outer.hydra if outer.is_initialized() else None
    outer.clear()
    try:
        with initialize_config_module(CONF_MODULE, version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    finally:
        if previous is not None:
            GlobalHydra.instance().initialize(previous)


def generate(cfg: DictConfig, output_dir: str | Path | None = None,
             ranks: RankPool | None = None) -> dict[str, Any]:
    """Validate `cfg`, start its ranks, and return rank 0's record of the run (what run.json
    holds, plus `images` and `output_dir`). Under torchrun or SLURM, where every rank calls this,
    every rank gets rank 0's record, whose `output_dir` is where rank 0 wrote (each rank's own
    `output_dir` is only a default: rank 0's is the run's). A rank that fails raises RankFailed
    (paraflow.errors): one line naming the rank, the cause and the stage it was in. `ranks`: a
    RankPool of launcher.devices ranks, kept across calls (paraflow.pool), instead of a launch
    for this run alone."""
    target = output_dir if output_dir is not None else cfg.output_dir
    if target is None:
        raise ParaflowError("output_dir is not set: pass generate(cfg, output_dir)")
    validate(cfg, target)
    with open_dict(cfg):
        cfg.output_dir = str(Path(target).resolve())
    if ranks is not None and int(cfg.launcher.devices) > 1:
        result = ranks.run(run_on_rank, cfg)
    else:
        result = launch(cfg, run_on_rank, explain=True)
    if result is None:  # run_on_rank returns None on ranks > 0, but launch hands back rank 0's
        raise RuntimeError("the launch returned no record of the run")
    return result
