"""The denoise stage's step cache in the plan (paraflow/cache): which steps reuse, and the replay
that runs them with the cache installed.

Meta tensors hold no values, so a cache that decides on them (`first_block`: the first block's
change against its threshold) is told what to decide: `plan_cache_hit_rate`, the fraction of the
steps after the first that reuse, spread evenly over them (rate 0.5: every other step). A cache
that reuses on a schedule of step numbers (`deepcache`: a full step every `interval` steps) needs
no rate, and a rate given with it is refused: its reuse is known exactly.

The replay installs the stage's own hooks (paraflow.cache.step.StepCache) and runs the steps the
run makes: on a reused step the skipped blocks run nothing, so the strategy's layers in them
exchange nothing and compute nothing, and the cached features are live memory between steps; a
first_block decision books its all-reduce of the ranks sharing the image. One step of each kind
is replayed (rank.py, `step_kinds`): the strategy's kind of step (Planned.distinct_steps),
whether it reuses, and whether it is the first (nothing cached, nothing to decide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from paraflow.cache import DeepCacheOptions, cache_kind, cache_options
from paraflow.cache.step import StepCache
from paraflow.errors import ParaflowError
from paraflow.graph import DenoiserCalls, execution_order
from paraflow.loop import LoopHook, Step

RATE = "plan_cache_hit_rate"


@dataclass(frozen=True)
class PlannedCache:
    """A run's step cache as planned: the denoise stage `stage`'s `kind` with `options`, and
    per step of the run whether it reuses (`reuse[0]` is always False: nothing is cached yet);
    `source` says where the pattern comes from."""

    stage: str
    kind: str
    options: Any
    reuse: tuple[bool, ...]
    source: str
    decides: bool  # decided on the values (an all-reduce per step); else by the step number

    @property
    def full_calls(self) -> int:
        return self.reuse.count(False)

    @property
    def hit_rate(self) -> float:
        """The fraction of the steps after the first that reuse."""
        return sum(self.reuse) / (len(self.reuse) - 1) if len(self.reuse) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, **vars(self.options), "hit_rate": round(self.hit_rate, 4),
                "from": self.source, "full_calls": self.full_calls, "steps": len(self.reuse),
                "reused_steps": [s for s, r in enumerate(self.reuse) if r]}


def spread(rate: float, steps: int) -> tuple[bool, ...]:
    """`rate` of the steps after the first reusing, as evenly as they go: step j (1, 2, ...)
    reuses when j·k/m, rounded, goes up: k = rate·m rounded, of the m = steps − 1
    (0.5: steps 1, 3, 5, ...; 0.25: 2, 6, 10, ...)."""
    after = max(steps - 1, 0)
    hits = int(rate * after + 0.5)
    marks = [(2 * j * hits + after) // (2 * after) if after else 0 for j in range(after + 1)]
    return (False, *(marks[j] > marks[j - 1] for j in range(1, after + 1)))


def scheduled(options: Any, steps: int) -> tuple[bool, ...] | None:
    """The steps a cache that decides by the step number reuses (None: it decides on values).
    Kept in step with paraflow/cache/step.py's schedule; the replay checks it (`Decisions`)."""
    if isinstance(options, DeepCacheOptions):
        return tuple(s > 0 and s % options.interval != 0 for s in range(steps))
    full = getattr(options, "full", None)  # a kind with a schedule of full steps of its own
    if callable(full):
        return tuple(s > 0 and not full(s) for s in range(steps))
    return None


def cache_stage(cfg: DictConfig) -> tuple[str, Any] | None:
    """The first stage (in execution order) that takes a step cache and runs the planned
    denoiser (not another of pipeline.models): its name and spec."""
    stages = cfg.pipeline.stages
    for name in execution_order(stages):
        spec = stages[name]
        other_model = (spec.get("options") or {}).get("model")
        if getattr(get_class(spec._target_), "caches", False) and not other_model:
            return name, spec
    return None


def planned_cache(cfg: DictConfig) -> tuple[PlannedCache | None, list[str]]:
    """The run's step cache as the plan replays it (None: no cache, or one the planner does not
    know the reuse of), and notes; ParaflowError for a bad or needless plan_cache_hit_rate."""
    rate = cfg.get(RATE)
    if rate is not None and not 0 <= float(rate) < 1:
        raise ParaflowError(f"{RATE}={rate}: the fraction of the steps after the first that a "
                            "step cache reuses, in [0, 1)")
    found = cache_stage(cfg)
    spec = found[1] if found is not None else None
    kind = cache_kind(spec) if spec is not None else "none"
    options = cache_options(found[0], spec) if found is not None else None
    steps = int(cfg.steps)
    if found is None or options is None:
        if rate is not None:
            raise ParaflowError(f"{RATE}={rate}: the run has no step cache "
                                "(pipeline.stages.denoise.cache=none)")
        return None, []
    stage, key = found[0], f"pipeline.stages.{found[0]}"
    pattern = scheduled(options, steps)
    if pattern is not None:
        if rate is not None:
            raise ParaflowError(f"{RATE}={rate}: {key}.cache={kind} reuses on a schedule of "
                                f"step numbers ({_options(options)}), known without a rate; "
                                f"leave {RATE} unset")
        return PlannedCache(stage, kind, options, pattern, "schedule", decides=False), []
    threshold = getattr(options, "threshold", None)
    if threshold is None:
        return None, [f"{key}.cache={kind}: the planner does not know its reuse; planned "
                      "as if every step ran whole"]
    if threshold <= 0:
        if rate is not None and float(rate) > 0:
            raise ParaflowError(f"{RATE}={rate}: {key}.cache_options.threshold={threshold} "
                                "never reuses")
        return PlannedCache(stage, kind, options, (False,) * steps, "threshold 0",
                            decides=False), []
    if rate is None:
        return PlannedCache(stage, kind, options, (False,) * steps,
                            f"{RATE} unset: 0", decides=True), [
            f"{key}.cache={kind} reuses when the images allow, which meta tensors cannot "
            f"tell: planned with no step reused (the most compute and bytes); set {RATE}"]
    return PlannedCache(stage, kind, options, spread(float(rate), steps), f"{RATE}={rate}",
                        decides=True), []


def _options(options: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in vars(options).items())


class Decisions(LoopHook):
    """The replay's cache decisions: a cache deciding on values is answered from the planned
    pattern (CacheState.verdict); each step's decision is recorded and checked against it."""

    def __init__(self, hook: StepCache, cache: PlannedCache) -> None:
        self.hook, self.cache, self.step = hook, cache, 0
        hook.state.verdict = self.verdict

    def verdict(self, sums: torch.Tensor) -> bool:
        """The planned decision of the step being replayed (the sums, on meta, hold nothing)."""
        return self.cache.reuse[self.step]

    def before_step(self, step: Step) -> None:
        self.step = step.index

    def after_denoiser(self, step: Step, prediction: torch.Tensor) -> None:
        reused = self.hook.state.reuse
        if reused != self.cache.reuse[step.index]:
            raise RuntimeError(f"planner: cache={self.cache.kind} {'reused' if reused else 'ran'}"
                               f" step {step.index}, planned to "
                               f"{'reuse' if self.cache.reuse[step.index] else 'run'} "
                               "(paraflow/plan/cache.py: `scheduled` no longer matches "
                               "paraflow/cache/step.py)")

    def end(self) -> None:
        self.hook.state.verdict = None


def cache_hooks(unet: Any, family: Any, cache: PlannedCache, comm: Any) -> list[LoopHook]:
    """The stage's cache hook on the meta denoiser (over `comm`, the ranks sharing the image),
    and the planned decisions after it."""
    hook = StepCache(unet, family, cache.kind, cache.options, comm, DenoiserCalls())
    return [hook, Decisions(hook, cache)]
