"""One device: the strategy used when none is given."""

from __future__ import annotations

from paraflow.strategies.base import ReplicatedModel


class SingleDevice(ReplicatedModel):
    name = "single"
