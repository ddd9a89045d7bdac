"""Strategies are plugins found through the entry-point group `paraflow.strategies` (name →
class); what they must provide is paraflow.plugin.Strategy."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from omegaconf import DictConfig

from paraflow.config import plain_dict
from paraflow.errors import ParaflowError
from paraflow.plugin import Strategy

GROUP = "paraflow.strategies"


def available_strategies() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def build_strategy(strategy_cfg: DictConfig | None) -> Strategy:
    """The strategy object for a `strategy` config (None: one device)."""
    found = available_strategies()
    name = "single" if strategy_cfg is None else str(strategy_cfg.name)
    if name not in found:
        raise ParaflowError(f"strategy.name={name} is not an installed strategy; installed: "
                            f"{', '.join(sorted(found))} (entry-point group {GROUP})")
    options: dict[str, Any] = {}
    if strategy_cfg is not None:
        options = {k: v for k, v in plain_dict(strategy_cfg).items()
                   if k != "name"}
    strategy = found[name].load()(**options)
    if not isinstance(strategy, Strategy):
        members = {*Strategy.__annotations__, *(m for m in vars(Strategy) if m[0] != "_")}
        missing = sorted(m for m in members if not hasattr(strategy, m))
        raise ParaflowError(f"strategy {name} ({found[name].value}) lacks {', '.join(missing)} "
                            "of paraflow.plugin.Strategy; subclass paraflow.plugin.StrategyBase "
                            "for the defaults")
    return strategy
