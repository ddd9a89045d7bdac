"""The pipeline as a graph of stages, run in dependency order.

A stage is a class with a `components` tuple (the pipeline parts it uses, moved under its policy)
and `__call__(env, **inputs) -> dict of outputs`, optionally a `check(cfg, spec)` run before
launch (paraflow/validate.py). The config names each stage's inputs and outputs ("VALUE as
PARAM" and "OUTPUT as VALUE" rename one); the order is derived from those names, not from the
order in the file. A stage whose options name a model (options.model) runs on that one of the
pipeline's models.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from hydra.utils import get_class

from paraflow.compile import compile_stage_modules
from paraflow.errors import ParaflowError, set_stage
from paraflow.policy import applied_policy

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from paraflow.context import ParallelContext
    from paraflow.outputs import OutputSink
    from paraflow.plugin import Strategy

# Values the runner provides before the first stage.
RUN_INPUTS = ("prompts", "image_ids")


def input_binding(entry: str) -> tuple[str, str]:
    """(value, parameter) of one entry of a stage's `inputs`: "latents" passes the value
    `latents` as the parameter of that name; "vignetted as pixels" passes the value
    `vignetted` as `pixels` (a stage wired to another producer than the stock one)."""
    value, _, parameter = (part.strip() for part in entry.partition(" as "))
    return value, parameter or value


def output_binding(entry: str) -> tuple[str, str]:
    """(the stage's output, value) of one entry of its `outputs`: "latents as base_latents"
    keeps the stage's `latents` as the value `base_latents` (one stage class used twice)."""
    return input_binding(entry)


def produced(spec: Any) -> list[str]:
    """The values a stage's config says it produces."""
    return [output_binding(entry)[1] for entry in spec.outputs]


class Stage(Protocol):
    components: tuple[str, ...]

    def __call__(self, env: StageEnv, **inputs: Any) -> dict[str, Any]: ...


@dataclass
class DenoiserCalls:
    """What the denoise stages of a generation did, step by step: full denoiser calls, and the
    steps a step cache reused (paraflow/cache; run.json's denoiser_calls)."""

    full: int = 0
    reused: list[int] = field(default_factory=list)

    def record(self, step: int, reused: bool) -> None:
        if reused:
            self.reused.append(step)
        else:
            self.full += 1


@dataclass
class StageEnv:
    """What every stage may read: the run config, the rank, the model and the strategy."""

    cfg: DictConfig
    ctx: ParallelContext
    pipe: Any
    strategy: Strategy
    sink: OutputSink
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # set from the running stage's policy
    spec: Any = None  # the running stage's config (StageConfig)
    stage: str = ""  # and its name in pipeline.stages
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # The latents after every denoising step, (batch, steps, C, h, w), when save_trajectory.
    trajectory: torch.Tensor | None = None
    # Called by the denoising loop after each step (done, of): a host application's progress
    # report; raising from it stops the run there (a service's cancellation).
    on_step: Callable[[int, int], None] | None = None
    # Long-lived helpers a host application hands its stages by name (the service's embedding
    # cache); the built-in stages need none.
    services: dict[str, Any] = field(default_factory=dict)
    # The pipeline's other models by name (pipeline.models); a stage with options.model=NAME
    # sees that one as `pipe` while it runs.
    models: dict[str, Any] = field(default_factory=dict)
    denoiser_calls: DenoiserCalls = field(default_factory=DenoiserCalls)


@dataclass
class StageNode:
    name: str
    stage: Stage
    spec: Any  # StageConfig


def execution_order(stages: Mapping[str, Any], provided: Iterable[str] = RUN_INPUTS) -> list[str]:
    """Names of `stages` in an order where each stage's inputs already exist."""
    available = set(provided)
    producers: dict[str, str] = {}
    for name, spec in stages.items():
        for out in produced(spec):
            if out in producers or out in available:
                raise ParaflowError(f"pipeline: '{out}' is produced by both "
                                    f"'{producers.get(out, 'the run')}' and '{name}'")
            producers[out] = name
    for name, spec in stages.items():
        for needed, _ in map(input_binding, spec.inputs):
            if needed not in producers and needed not in available:
                known = sorted(available | producers.keys())
                raise ParaflowError(f"pipeline.stages.{name}: input '{needed}' is produced by "
                                    f"no stage; available: {known}")
    order: list[str] = []
    pending = dict(stages)
    while pending:
        ready = [n for n, s in pending.items()
                 if all(input_binding(i)[0] in available for i in s.inputs)]
        if not ready:
            raise ParaflowError(f"pipeline: stages {sorted(pending)} form a cycle")
        for name in ready:
            order.append(name)
            available.update(produced(pending.pop(name)))
    return order


class StageGraph:
    def __init__(self, nodes: list[StageNode]) -> None:
        self.nodes = nodes

    @classmethod
    def from_config(cls, stages: Mapping[str, Any]) -> StageGraph:
        order = execution_order(stages)
        return cls([StageNode(n, get_class(stages[n]._target_)(), stages[n]) for n in order])

    def run(self, env: StageEnv, values: dict[str, Any]) -> dict[str, Any]:
        main = env.pipe
        try:
            for node in self.nodes:
                env.pipe = stage_model(env, node, main)
                self._run_node(env, node, values)
        finally:
            env.pipe = main
        return values

    def _run_node(self, env: StageEnv, node: StageNode, values: dict[str, Any]) -> None:
        named = {c: getattr(env.pipe, c) for c in node.stage.components
                 if getattr(env.pipe, c, None) is not None}
        modules = list(named.values())
        inputs = {p: values[v] for v, p in map(input_binding, node.spec.inputs)}
        start = time.perf_counter()
        env.spec, env.stage = node.spec, node.name
        set_stage(node.name)  # what a failure of this rank reports (paraflow/errors.py)
        with applied_policy(node.spec, modules, env.ctx.device) as (env.device, env.dtype):
            compile_stage_modules(node.spec, named)
            outputs = node.stage(env, **inputs)
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
        env.seconds[node.name] += time.perf_counter() - start
        bound = [output_binding(entry) for entry in node.spec.outputs]
        missing = sorted({key for key, _ in bound} - outputs.keys())
        if missing:
            raise RuntimeError(f"stage '{node.name}' did not produce {missing}")
        values.update({value: outputs[key] for key, value in bound})


def stage_model(env: StageEnv, node: StageNode, main: Any) -> Any:
    """The pipeline a stage runs on: the run's, or the one its options.model names."""
    name = (node.spec.get("options") or {}).get("model")
    if name is None:
        return main
    if name not in env.models:
        raise ParaflowError(f"pipeline.stages.{node.name}: options.model={name}, but the "
                            f"loaded models are {sorted(env.models) or 'none'} "
                            "(pipeline.models)")
    return env.models[name]
