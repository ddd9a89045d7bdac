"""One instance: `python -m paraflow.serve.instance [overrides]` loads the pipeline once, warms it
up and serves it with uvicorn on serve.instance.host:port (127.0.0.1 unless told otherwise).
With serve.instance.devices=k > 1 the instance is a group of k ranks running the configured
strategy (group.py). The supervisor (`python -m paraflow.serve`) starts these; on another
machine start them by hand and list them in serve.remote."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.serve.schedulers import scheduler_configs


def build(overrides: Sequence[str]) -> tuple[DictConfig, Any]:
    """The composed config and the FastAPI app of a started, warmed-up instance."""
    from paraflow.serve.app import create_app
    from paraflow.serve.engine import Engine

    cfg = compose(list(overrides))
    engine = Engine(cfg, scheduler_configs(list(cfg.serve.limits.schedulers)))
    engine.start(warmup=bool(cfg.serve.instance.warmup))
    return cfg, create_app(engine)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from paraflow.errors import RankFailed

    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__.strip())
        return 0
    try:
        if int(compose(args).serve.instance.devices) > 1:  # a rank group (group.py)
            from paraflow.serve.group import run_group

            run_group(compose(args))
            return 0
        cfg, app = build(args)
    except (ParaflowError, RankFailed) as err:
        print(f"paraflow.serve.instance: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParaflowError) else 1
    instance = cfg.serve.instance
    uvicorn.run(app, host=str(instance.host), port=int(instance.port), log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
