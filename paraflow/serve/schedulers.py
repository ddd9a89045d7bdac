"""The scheduler configs a request may name, composed once when an instance starts (by one
process, instance.py, or every rank of a group, group.py)."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from paraflow.api import compose
from paraflow.errors import ParaflowError


def scheduler_configs(names: Sequence[str]) -> dict[str, DictConfig]:
    """The scheduler configs a request may name (conf/scheduler/NAME.yaml)."""
    found = {}
    for name in names:
        try:
            found[name] = compose([f"scheduler={name}"]).scheduler
        except Exception as err:
            raise ParaflowError(f"serve.limits.schedulers: no scheduler config {name!r} "
                                f"({type(err).__name__})") from None
    return found
