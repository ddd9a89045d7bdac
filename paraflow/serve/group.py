"""An instance that is a group of k ranks running a paraflow strategy (`+strategy=sync_patch
serve.instance.devices=2`, distrifusion, tensor, hybrids): the ranks are launched once, as a run's
are, and stay alive across requests. Rank 0 serves HTTP and hands each job to its peers (an
all-gather of the job's description), every rank runs its part of the strategy, and the images
come back to rank 0 through the strategy's own gather; a size is just a field of the job, so every
size a request may ask for runs without a restart. Idle, rank 0 pings the peers every PING_S so
their wait for the next job never reaches the collective timeout. A rank that dies takes the
whole instance down (the launcher stops the others), and the supervisor restarts it whole."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict

from paraflow.context import ParallelContext


def serve_on_rank(ctx: ParallelContext, cfg: DictConfig) -> None:
    import uvicorn

    from paraflow.serve.app import create_app
    from paraflow.serve.engine import Engine
    from paraflow.serve.schedulers import scheduler_configs

    engine = Engine(cfg, scheduler_configs(list(cfg.serve.limits.schedulers)), ctx=ctx)
    if not ctx.is_main:
        engine.follow()
        return
    app = create_app(engine)
    engine.start(warmup=bool(cfg.serve.instance.warmup))  # every rank takes part
    instance = cfg.serve.instance
    try:
        uvicorn.run(app, host=str(instance.host), port=int(instance.port), log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        engine.stop()  # the peers return too


def run_group(cfg: DictConfig) -> Any:
    """Launch the instance's ranks (launcher.devices = serve.instance.devices) and serve until
    stopped."""
    from paraflow.launcher import launch

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.launcher.devices, cfg.launcher.num_nodes = int(cfg.serve.instance.devices), 1
    return launch(cfg, serve_on_rank, explain=True)
