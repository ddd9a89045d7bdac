"""Step caching, a policy of the denoise stage: `pipeline.stages.denoise.cache=KIND` with
`pipeline.stages.denoise.cache_options.NAME=VALUE`. Adjacent denoising steps are alike, so part
of a step's work can be reused from the last full step:

- `first_block` (every family): the first block runs every step; when its output moved less than
  `threshold` (relative L1) since the last full step, the rest is reused. A transformer reuses
  the rest's residual on top of the fresh first block (First-Block Cache); a UNet, whose blocks
  do not share one residual stream, reuses the whole prediction (its first down block decides).
- `deepcache` (UNets): every `interval`-th step runs whole; the others run only the outermost
  blocks (conv_in, the first down block, the last up block) around the deep features cached at
  the last full step (DeepCache).
- `taylorseer` (transformers): the first `warmup` steps run whole, then every `interval`-th
  step; on the others the first block runs and the rest's residual is forecast from the last
  full steps by a Taylor expansion of order `order` (TaylorSeer; taylorseer.py).

The decision is one for every rank holding the same image: the ranks add up their bands' sums in
one small all-reduce per step (counted by the communicator), so a band strategy skips or runs the
rest on all its ranks together and decides as one device would. `data` replicas decide alone.
deepcache and taylorseer decide by the step number alone, the same on every rank with no
collective.
The hooks are written here with diffusers' hook registry (diffusers' own FirstBlockCache decides
per process and knows no UNet, see hooks.py; why not its TaylorSeer: taylorseer.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from paraflow.errors import ParaflowError


@dataclass(frozen=True)
class FirstBlockOptions:
    threshold: float = 0.08  # relative L1 change of the first block's output; 0: never reuse

    def check(self, key: str) -> None:
        if self.threshold < 0:
            raise ParaflowError(f"{key}.threshold={self.threshold}: must be >= 0")


@dataclass(frozen=True)
class DeepCacheOptions:
    interval: int = 3  # a full step every `interval` steps (1: every step, no reuse)

    def check(self, key: str) -> None:
        if self.interval < 1:
            raise ParaflowError(f"{key}.interval={self.interval}: must be at least 1")


@dataclass(frozen=True)
class TaylorSeerOptions:
    # A full step every `interval` steps (1: every step, no forecast). 3 spends a third of the
    # calls, as deepcache's default does: at paraflow's 20 steps, 5 would leave only a handful of
    # full steps to extrapolate from and each forecast's error grows with its distance from them.
    interval: int = 3
    # The Taylor expansion's order: 0 reuses the last full step's residual as is; 1 adds its
    # first difference over the last two full steps; 2 its second (three full steps).
    order: int = 1
    # Full steps at the start (at least 1), the last of which begins the first interval; early
    # steps change the most.
    warmup: int = 2

    def check(self, key: str) -> None:
        if self.interval < 1:
            raise ParaflowError(f"{key}.interval={self.interval}: must be at least 1")
        if self.order < 0:
            raise ParaflowError(f"{key}.order={self.order}: must be >= 0")
        if self.warmup < 1:
            raise ParaflowError(f"{key}.warmup={self.warmup}: must be at least 1 (the first "
                                "step runs whole)")

    def full(self, index: int) -> bool:
        """Whether step `index` (0 first) runs whole: one of the first `warmup`, or an
        `interval`-th counted from the last of them."""
        return index < self.warmup or (index - self.warmup + 1) % self.interval == 0


KINDS: dict[str, type | None] = {"none": None, "first_block": FirstBlockOptions,
                                 "deepcache": DeepCacheOptions,
                                 "taylorseer": TaylorSeerOptions}


def cache_kind(spec: Any) -> str:
    """The stage's cache kind, as a string (the schema holds an enum)."""
    kind = spec.get("cache") or "none"
    return str(getattr(kind, "value", kind))


def cache_options(stage: str, spec: Any) -> Any:
    """The options of `spec`'s cache (None for cache=none), or ParaflowError naming the key and
    what is allowed. The schema (paraflow/config.py: CacheKind, CacheOptions) has already
    refused unknown kinds and option names."""
    kind = cache_kind(spec)
    key = f"pipeline.stages.{stage}"
    if kind not in KINDS:
        raise ParaflowError(f"{key}.cache={kind}: one of {', '.join(KINDS)}")
    given = {name: value for name, value in dict(spec.get("cache_options") or {}).items()
             if value is not None}
    options_class = KINDS[kind]
    allowed = [f.name for f in fields(options_class)] if options_class is not None else []
    for name in given:
        if name not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no options"
            raise ParaflowError(f"{key}.cache_options.{name}: cache={kind} {takes}")
    if options_class is None:
        return None
    options = options_class(**given)
    options.check(f"{key}.cache_options")
    return options


def check_cache(stage: str, spec: Any, stage_class: type, family: Any) -> None:
    """Pre-launch: the cache kind and options of stage `stage`, on a stage that caches
    (a `caches = True` class: the denoise stages), for a family that takes that kind."""
    options = cache_options(stage, spec)
    if options is None:
        return
    kind = cache_kind(spec)
    if not getattr(stage_class, "caches", False):
        raise ParaflowError(f"pipeline.stages.{stage}.cache={kind}: {stage_class.__name__} "
                            "cannot cache; only a denoise stage can")
    if family is not None and kind not in family.caches:
        raise ParaflowError(f"pipeline.stages.{stage}.cache={kind}: a {family.name} model "
                            f"takes {', '.join(family.caches)}")
