"""One rank's session: everything a rank needs, built once — the pipeline and the pipeline's other
models (pipeline.models), the strategy set up and laid over them, the stage graph — then any
number of generations through it. A run (run.py) makes one generation and records it; a service
instance (serve/engine.py) makes one per batch of requests; the planner builds the same session
over meta modules and replays the same denoise loop through it (plan/rank.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from paraflow.attention import attention_backend
from paraflow.compile import any_stage_compiles, fresh_compilation
from paraflow.context import ParallelContext
from paraflow.families import latent_shape
from paraflow.graph import StageEnv, StageGraph
from paraflow.models import load_pipeline
from paraflow.models.lora import activate_adapters
from paraflow.outputs import OutputSink
from paraflow.plugin import Strategy
from paraflow.registry import build_strategy
from paraflow.sizes import output_size, with_binned_size

FAULT_ENV = "PARAFLOW_FAIL_RANK"  # tests: make this rank raise mid-run


def injected_failure(ctx: ParallelContext) -> None:
    if os.environ.get(FAULT_ENV) == str(ctx.rank):
        raise RuntimeError(f"injected failure on rank {ctx.rank} ({FAULT_ENV})")


@dataclass
class Generated:
    """One generation's result on this rank: the gathered images (rank 0 holds them all), the
    ids this rank made, and the stage graph's environment (seconds per stage)."""

    sink: OutputSink
    image_ids: list[int]
    env: StageEnv


Loader = Callable[[DictConfig, DictConfig], Any]  # (model config, scheduler config) → pipeline


class Session:
    """`cfg`'s pipeline on `ctx`'s rank. `strategy`: one already built from cfg.strategy (the
    validation's), else built here — once per rank either way; set up here. `load`: how a
    model config becomes a pipeline (the planner's loads meta modules: plan/rank.py)."""

    def __init__(self, ctx: ParallelContext, cfg: DictConfig, strategy: Strategy | None = None,
                 load: Loader = load_pipeline) -> None:
        self.ctx, self.cfg = ctx, cfg
        if any_stage_compiles(cfg.pipeline.stages):
            fresh_compilation(cfg)
        self.pipe = load(cfg.model, cfg.scheduler)
        self.strategy = strategy or build_strategy(cfg.strategy)
        self.strategy.setup(ctx)
        self.strategy.parallelize(self.pipe, ctx)
        self.models = {name: load(model_cfg, cfg.scheduler)
                       for name, model_cfg in (cfg.pipeline.get("models") or {}).items()}
        for other in self.models.values():
            self.strategy.parallelize(other, ctx)
        self.graphs = {str(cfg.pipeline.name): StageGraph.from_config(cfg.pipeline.stages)}

    def graph(self, pipeline: DictConfig) -> StageGraph:
        """The stage graph of `pipeline` (the session's own, or another over the same models:
        a service's edits run img2img and inpaint), built once."""
        name = str(pipeline.name)
        if name not in self.graphs:
            self.graphs[name] = StageGraph.from_config(pipeline.stages)
        return self.graphs[name]

    def generate(self, cfg: DictConfig, prompts: list[str], keep_latents: bool = False,
                 services: dict[str, Any] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> Generated:
        """One image per prompt (`cfg`: this generation's run keys — size, steps, seed, ...,
        over the session's pipeline), this rank's share in batches of pipeline.max_batch, then
        gathered by the strategy. `services`: the host's helpers by name (StageEnv.services);
        `on_step(done, of)`: called after every denoising step."""
        cfg = with_binned_size(cfg)
        latents = latent_shape(self.pipe, int(cfg.height), int(cfg.width))
        kept = (int(cfg.steps), *latents) if cfg.get("save_trajectory") else latents
        sink = OutputSink((*output_size(cfg), 3), kept, keep_latents)
        env = StageEnv(cfg=cfg, ctx=self.ctx, pipe=self.pipe, strategy=self.strategy, sink=sink,
                       models=self.models, services=services or {})
        env.on_step = on_step
        activate_adapters(self.pipe, self.cfg.model, cfg.get("lora") or [])
        mine = self.strategy.assign_images(len(prompts), self.ctx)
        batch, graph = int(cfg.pipeline.max_batch), self.graph(cfg.pipeline)
        with torch.inference_mode(), attention_backend(str(self.cfg.attention.backend)):
            for first in range(0, len(mine), batch):
                ids = mine[first:first + batch]
                graph.run(env, {"prompts": [prompts[i] for i in ids], "image_ids": ids})
                injected_failure(self.ctx)
            gathered = self.strategy.gather(sink, self.ctx)
        return Generated(gathered, mine, env)
