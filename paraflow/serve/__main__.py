"""python -m paraflow.serve [overrides]: N instances behind HAProxy on this machine, until
Ctrl-C or SIGTERM (paraflow/serve/supervisor.py). The overrides are the run config's (model=...,
launcher.devices=N) and the serve group's (serve.front.port=..., serve.cache.redis_url=...)."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.serve.adapters import check_served_adapters
from paraflow.serve.supervisor import Supervisor


def _wait_front(url: str, supervisor: Supervisor, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not supervisor.stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(__doc__.strip() + "\n\nThe serve group and its defaults:\n"
              + OmegaConf.to_yaml(compose([]).serve))
        return 0
    try:
        cfg = compose(overrides)
        binary = str(cfg.serve.front.binary)
        if shutil.which(binary) is None:
            raise ParaflowError(f"serve.front.binary={binary}: not found; install HAProxy "
                                "(Debian: apt-get install haproxy)")
        check_served_adapters(cfg)
        run_dir = Path(cfg.output_dir or f"outputs/serve-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.mkdir(parents=True, exist_ok=True)
        supervisor = Supervisor(cfg, overrides, run_dir.resolve())
    except (ParaflowError, HydraException) as err:
        print(f"paraflow.serve: {err}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    supervisor.start()
    front = cfg.serve.front
    url = f"http://{front.host}:{int(front.port)}"

    def announce() -> None:
        if _wait_front(f"{url}/readyz", supervisor, float(cfg.serve.ready_timeout_s)):
            print(f"paraflow.serve: {url}/v1/images/generations ({len(supervisor.instances)} "
                  f"instance(s); HAProxy stats http://{front.host}:{int(front.stats_port)}"
                  f"/stats; logs in {run_dir}); Ctrl-C stops", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    supervisor.run()  # until SIGTERM / SIGINT, then every child is stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
