"""Which family a denoiser belongs to: the entry-point group `paraflow.families` (name →
family class, as strategies are found), matched by the denoiser's class or any base class of it,
so an outside package adds a family by declaring one entry point."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from paraflow.errors import ParaflowError
from paraflow.families.base import Family

GROUP = "paraflow.families"


@cache
def families() -> dict[str, Family]:
    """Every installed family, by name."""
    return {ep.name: ep.load()() for ep in entry_points(group=GROUP)}


def family_named(class_names: list[str]) -> Family:
    """The family of the first class name (a denoiser's class, then its bases) one declares."""
    for class_name in class_names:
        for family in families().values():
            if class_name in family.denoisers:
                return family
    known = sorted(n for f in families().values() for n in f.denoisers)
    raise ParaflowError(f"denoiser {class_names[0]}: no model family takes it (installed "
                        f"families take {', '.join(known)}; a family plugin adds more through "
                        f"the '{GROUP}' entry points)")


def family_of(model: Any) -> Family:
    """The family of a denoiser module (loaded or on the meta device)."""
    return family_named([c.__name__ for c in type(model).__mro__])


def family_of_class_name(name: str) -> Family:
    """The family of a denoiser class named in a config (`_class_name`)."""
    return family_named([name])
