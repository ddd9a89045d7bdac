"""The pipeline loaded once and kept: jobs run one after another on a worker thread (the device
is one), through the same stage graph a run uses, with the embedding cache swapped in for the
encode stage, per-step progress and cancellation at the next step.

A job is a checked request (paraflow/serve/requests.py). Image i of a job starts from the noise
of seed + i, as in a run with images_per_prompt=n, so a request and `python -m paraflow` with the
same prompt, seed, size, steps and guidance give the same image.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict
from PIL import Image

from paraflow.adapters import latent_channels, latent_downsampling
from paraflow.config import plain_dict
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.graph import StageEnv, StageGraph
from paraflow.models import load_pipeline
from paraflow.outputs import OutputSink
from paraflow.registry import build_strategy
from paraflow.serve.embeddings import SERVICE, CachedEncodePrompt, EmbeddingCache
from paraflow.serve.metrics import InstanceMetrics
from paraflow.serve.requests import ImagesRequest, ServedLimits
from paraflow.stages.encode import EncodePrompt
from paraflow.validate import model_factor, resolve_accelerator, validate

SLOW_ENV = "PARAFLOW_SERVE_STEP_DELAY_S"  # tests: make this instance slower by s per step
PING_S = 5.0  # an idle rank group's heartbeat (well inside launcher.timeout_s)
PING, STOP = "ping", "stop"


class Cancelled(Exception):
    """The client went away or cancelled: the job stops at the next step."""


class Busy(Exception):
    """The instance's queue is full (answered 429)."""


@dataclass
class Job:
    request: ImagesRequest
    width: int
    height: int
    seed: int
    on_progress: Callable[[dict[str, Any]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future[list[bytes]] = field(
        default_factory=concurrent.futures.Future)
    steps_run: int = 0
    accepted: float = field(default_factory=time.perf_counter)


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _cached_encode(cfg: DictConfig) -> None:
    """Stages that encode prompts go through the service's embedding cache."""
    with open_dict(cfg):
        for spec in cfg.pipeline.stages.values():
            if get_class(spec._target_) is EncodePrompt:
                spec._target_ = f"{CachedEncodePrompt.__module__}.{CachedEncodePrompt.__name__}"


class Engine:
    """One instance's pipeline. With `ctx` of a rank group (paraflow/serve/group.py) every rank
    builds one: rank 0's takes the jobs and hands each to its peers, which `follow`."""

    def __init__(self, cfg: DictConfig, schedulers: dict[str, DictConfig],
                 metrics: InstanceMetrics | None = None,
                 ctx: ParallelContext | None = None) -> None:
        self.cfg = cfg.copy()
        with open_dict(self.cfg):  # this instance's ranks, not the whole service's
            self.cfg.launcher.devices = int(cfg.serve.instance.devices)
            self.cfg.launcher.num_nodes = 1
        _cached_encode(self.cfg)
        validate(self.cfg, None)
        self.metrics = metrics or InstanceMetrics()
        self.device = ctx.device if ctx is not None else torch.device(resolve_accelerator(cfg))
        if ctx is None and cfg.launcher.threads_per_rank is not None:
            torch.set_num_threads(int(cfg.launcher.threads_per_rank))
        self.ctx = ctx or ParallelContext.single(self.device)
        if self.ctx.world_size != int(self.cfg.launcher.devices):
            raise ParaflowError(f"serve.instance.devices={self.cfg.launcher.devices}, but the "
                                f"instance has {self.ctx.world_size} rank(s)")
        self.pipe = load_pipeline(cfg.model, cfg.scheduler)
        self.schedulers = {name: self._scheduler(s) for name, s in schedulers.items()}
        self.default_scheduler = str(cfg.scheduler.name)
        self.schedulers.setdefault(self.default_scheduler, self.pipe.scheduler)
        self.strategy = build_strategy(self.cfg.strategy)
        self.strategy.setup(self.ctx)
        self.strategy.parallelize(self.pipe, self.ctx)
        self.graph = StageGraph.from_config(self.cfg.pipeline.stages)
        serve = cfg.serve
        self.cache = EmbeddingCache(int(serve.cache.embeddings), serve.cache.redis_url,
                                    int(serve.cache.redis_ttl_s), self.metrics)
        limits = serve.limits
        self.limits = ServedLimits(str(cfg.model.name), model_factor(cfg.model),
                                   int(limits.max_side), int(limits.max_images),
                                   int(limits.max_steps), int(limits.max_prompt_chars),
                                   tuple(self.schedulers))
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=int(serve.instance.max_queue))
        self.ready = threading.Event()
        self.running: Job | None = None
        self.rank_pids = [int(p) for p in self.ctx.comm.gather_objects(os.getpid())]
        self.worker = threading.Thread(target=self._work, name="paraflow-engine", daemon=True)

    def _scheduler(self, spec: DictConfig) -> Any:
        """`spec`'s scheduler class on the model's own scheduler config (as a run builds it)."""
        cls: Any = get_class(spec._target_)
        return cls.from_config(self.pipe.scheduler.config, **plain_dict(spec.options))

    # --- the worker thread -----------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        self.worker.start()
        if warmup:  # the first call pays one-off costs (allocations, kernel choice)
            side = self.limits.multiple * 8
            request = ImagesRequest(prompt="warm-up", size=f"{side}x{side}", steps=1)
            self.submit(Job(request, side, side, 0)).result()
        self.ready.set()

    def submit(self, job: Job) -> concurrent.futures.Future[list[bytes]]:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.jobs.maxsize} requests are waiting in this instance") from None
        self.metrics.queue_depth.set(self.jobs.qsize())
        return job.future

    def _work(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=PING_S)
            except queue.Empty:  # idle: show the peers rank 0 is alive (their wait ends)
                self._tell_peers(PING)
                continue
            self.metrics.queue_depth.set(self.jobs.qsize())
            if job is None:  # stop
                self._tell_peers(STOP)
                return
            if job.cancelled.is_set():  # gone before it started
                job.future.cancel()
            if not job.future.set_running_or_notify_cancel():
                continue
            self.running = job
            self.metrics.in_flight.set(1)
            try:
                self._tell_peers({"request": job.request.model_dump(), "width": job.width,
                                  "height": job.height, "seed": job.seed})
                job.future.set_result(self.run(job))
            except Exception as err:  # the job's failure is its answer; the worker goes on
                job.future.set_exception(err)
            finally:
                self.running = None
                self.metrics.in_flight.set(0)
                self.metrics.sample_device(self.device)

    def stop(self) -> None:
        """Finish the queued jobs, then stop the worker (and the peers)."""
        self.jobs.put(None)
        self.worker.join()

    def _tell_peers(self, message: object) -> None:
        if self.ctx.world_size > 1:
            self.ctx.comm.gather_objects(message)  # an all-gather: the peers read rank 0's

    def follow(self) -> None:
        """A peer rank: run what rank 0 hands over, until it says stop."""
        while True:
            message = self.ctx.comm.gather_objects(None)[0]
            if message == STOP:
                return
            if message == PING:
                continue
            assert isinstance(message, dict)
            job = Job(ImagesRequest(**message["request"]), message["width"],
                      message["height"], message["seed"])
            try:
                self.run(job)
            except Cancelled:
                pass

    def run_config(self, job: Job) -> DictConfig:
        r = job.request
        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.prompt, cfg.negative_prompt = r.prompt, r.negative_prompt
            cfg.images_per_prompt, cfg.steps = r.n, r.steps
            cfg.guidance_scale, cfg.seed = r.guidance_scale, job.seed
            cfg.height, cfg.width = job.height, job.width
            cfg.pipeline.progress = False
        return cfg

    def run(self, job: Job) -> list[bytes]:
        cfg = self.run_config(job)
        self.pipe.scheduler = self.schedulers[job.request.scheduler or self.default_scheduler]
        factor = latent_downsampling(self.pipe)
        sink = OutputSink((job.height, job.width, 3),
                          (latent_channels(self.pipe), job.height // factor, job.width // factor))
        env = StageEnv(cfg=cfg, ctx=self.ctx, pipe=self.pipe, strategy=self.strategy, sink=sink,
                       services={SERVICE: self.cache})
        n = job.request.n
        ids = self.strategy.assign_images(n, self.ctx)
        batch = int(cfg.pipeline.max_batch)

        def on_step(done: int, of: int) -> None:
            job.steps_run += 1
            self.metrics.steps.inc()
            if job.on_progress is not None:
                job.on_progress({"step": done, "steps": of, "images": n})
            if self._stop_here(job):
                raise Cancelled(f"cancelled after step {done} of {of}")

        delay = float(os.environ.get(SLOW_ENV, "0"))
        if delay > 0:  # an injected slow device (tests of the front door's routing)
            report = on_step

            def on_step(done: int, of: int) -> None:
                time.sleep(delay)
                report(done, of)

        env.on_step = on_step
        with torch.inference_mode():
            for first in range(0, len(ids), batch):
                chunk = ids[first:first + batch]
                self.graph.run(env, {"prompts": [cfg.prompt] * len(chunk), "image_ids": chunk})
            gathered = self.strategy.gather(sink, self.ctx)
        if not self.ctx.is_main:
            return []
        self.metrics.images.inc(n)
        return [png(gathered.images[i]) for i in range(n)]

    def _stop_here(self, job: Job) -> bool:
        """Whether to stop after this step: rank 0's cancellation, agreed by every rank (they
        must leave the step loop together)."""
        if self.ctx.world_size == 1:
            return job.cancelled.is_set()
        flag = torch.tensor([1.0 if job.cancelled.is_set() else 0.0], device=self.device)
        return bool(self.ctx.comm.all_reduce(flag).item() > 0)


def new_seed() -> int:
    return secrets.randbelow(2**31)
