"""The plugin's config: its schema is also its default `+strategy=round_robin` config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RoundRobinConfig:
    name: str = "round_robin"
    reverse: bool = False  # deal from the last rank first


def register(store: Any) -> None:
    store.store(group="strategy", name="round_robin", node=RoundRobinConfig)
