"""The pipeline loaded once and kept: jobs run on a worker thread (the device is one), through the
same stage graph a run uses, with the service's stages swapped in (stages.py: the embedding
cache, a seed per image), per-step progress and cancellation at the next step.

Jobs waiting together with the same shape and settings (Job.batch_key, the LoRA adapters among
them: they are switched per batch) run as one batch of up to pipeline.max_batch images. Image i
of a job starts from the noise of seed + i, as in a run with images_per_prompt=n, so a request
and `python -m paraflow` with the same prompt, seed, size, steps and guidance give the same
image (bit-identical alone; in a batch, as a run's batches do).

Edits (an uploaded image, and a mask to inpaint) run the packaged img2img and inpaint pipelines
over the same loaded models, with the instance's per-stage policies: the job's files are written
to a folder of its own (Job.inputs) and the run keys image, mask and strength name them, so an
edit takes the very stages `python -m paraflow pipeline=img2img image=PATH` takes. Edits run alone.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from paraflow import devices
from paraflow.compile import any_stage_compiles
from paraflow.config import AdapterChoice
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError, stage_now
from paraflow.models import scheduler_for
from paraflow.serve.adapters import with_served_adapters
from paraflow.serve.embeddings import SERVICE, EmbeddingCache
from paraflow.serve.jobs import Busy, Cancelled, Job, png
from paraflow.serve.metrics import InstanceMetrics
from paraflow.serve.requests import ServedLimits
from paraflow.serve.stages import SEEDS, serving_stages
from paraflow.session import Session
from paraflow.validate import model_factor, resolve_accelerator, validate

SLOW_ENV = "PARAFLOW_SERVE_STEP_DELAY_S"  # tests: make this instance slower by s per step
PING_S = 5.0  # an idle rank group's heartbeat (well inside launcher.timeout_s)
PING, STOP = "ping", "stop"
POLICIES = ("precision", "placement", "offload", "parallel")  # a stage's, kept for edits


def edit_pipelines(cfg: DictConfig) -> dict[str, DictConfig]:
    """The packaged img2img and inpaint pipelines for `cfg`'s instance: its policies on the
    stages of the same name (an encode offloaded, a decode in bands), the service's stages."""
    from paraflow.api import compose

    own = cfg.pipeline
    edits = {}
    for name in ("img2img", "inpaint"):
        edit = cfg.copy()
        with open_dict(edit):
            edit.pipeline = compose([f"pipeline={name}"]).pipeline
            edit.pipeline.max_batch, edit.pipeline.progress = own.max_batch, False
            for stage, spec in edit.pipeline.stages.items():
                if stage in own.stages:
                    for policy in POLICIES:
                        spec[policy] = own.stages[stage].get(policy, spec[policy])
        serving_stages(edit)
        edits[name] = edit.pipeline
    return edits


def is_out_of_memory(err: BaseException) -> bool:
    """A device (torch's OutOfMemoryError, CUDA or other) or the host (the CPU allocator's
    RuntimeError) ran out of memory."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text \
        or "can't allocate memory" in text


class Engine:
    """One instance's pipeline. With `ctx` of a rank group (paraflow/serve/group.py) every rank
    builds one: rank 0's takes the jobs and hands each to its peers, which `follow`."""

    def __init__(self, cfg: DictConfig, schedulers: dict[str, DictConfig],
                 metrics: InstanceMetrics | None = None,
                 ctx: ParallelContext | None = None) -> None:
        self.cfg = with_served_adapters(cfg).copy()
        with open_dict(self.cfg):  # this instance's ranks, not the whole service's
            self.cfg.launcher.devices = int(cfg.serve.instance.devices)
            self.cfg.launcher.num_nodes = 1
        serving_stages(self.cfg)
        strategy = validate(self.cfg, None)
        self.edits = edit_pipelines(self.cfg)
        self.metrics = metrics or InstanceMetrics()
        self.device = ctx.device if ctx is not None else torch.device(resolve_accelerator(cfg))
        if ctx is None and cfg.launcher.threads_per_rank is not None:
            torch.set_num_threads(int(cfg.launcher.threads_per_rank))
        self.ctx = ctx or ParallelContext.single(self.device)
        if self.ctx.world_size != int(self.cfg.launcher.devices):
            raise ParaflowError(f"serve.instance.devices={self.cfg.launcher.devices}, but the "
                                f"instance has {self.ctx.world_size} rank(s)")
        self.session = Session(self.ctx, self.cfg, strategy)
        self.pipe, self.strategy = self.session.pipe, self.session.strategy
        self.schedulers = {name: self._scheduler(s) for name, s in schedulers.items()}
        self.default_scheduler = str(cfg.scheduler.name)
        self.schedulers.setdefault(self.default_scheduler, self.pipe.scheduler)
        serve = cfg.serve
        self.cache = EmbeddingCache(int(serve.cache.embeddings), serve.cache.redis_url,
                                    int(serve.cache.redis_ttl_s), self.metrics)
        limits = serve.limits
        self.limits = ServedLimits(str(cfg.model.name), model_factor(cfg.model),
                                   int(limits.max_side), int(limits.max_images),
                                   int(limits.max_steps), int(limits.max_prompt_chars),
                                   tuple(self.schedulers),
                                   tuple(str(a.name) for a in serve.get("lora") or []))
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=int(serve.instance.max_queue))
        self.held: collections.deque[Job | None] = collections.deque()  # taken, not batched
        self.max_batch = int(self.cfg.pipeline.max_batch)
        self.ready = threading.Event()
        self.running: list[Job] = []
        self.rank_pids = [int(p) for p in self.ctx.comm.gather_objects(os.getpid())]
        self.worker = threading.Thread(target=self._work, name="paraflow-engine", daemon=True)

    def _scheduler(self, spec: DictConfig) -> Any:
        """`spec`'s scheduler class on the model's own scheduler config (as a run builds it)."""
        return scheduler_for(self.pipe.scheduler, spec)

    # --- the worker thread -----------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        self.metrics.record_devices([devices.sample(self.device, self.ctx.rank)])
        self.worker.start()
        if warmup:  # the first call pays one-off costs (allocations, kernel choice)
            started = time.perf_counter()
            self.submit(self._warmup_job()).result()
            self.metrics.warmup.set(time.perf_counter() - started)
        self.ready.set()

    def _warmup_job(self) -> Job:
        """A small one-step request; an instance that compiles (pipeline.stages.*.compile)
        compiles at a request's default size and step count, the graphs most requests then
        reuse (another size recompiles once with dynamic shapes: torch's automatic dynamic)."""
        from paraflow.serve.requests import ImagesRequest

        default = ImagesRequest(prompt="warm-up")
        width, height = (int(v) for v in default.size.split("x"))
        if any_stage_compiles(self.cfg.pipeline.stages) and \
                not (width % self.limits.multiple or height % self.limits.multiple):
            steps = min(default.steps, self.limits.max_steps)
            return Job(default.model_copy(update={"steps": steps}), height, width, 0)
        side = self.limits.multiple * 8
        return Job(ImagesRequest(prompt="warm-up", size=f"{side}x{side}", steps=1), side, side, 0)

    def submit(self, job: Job) -> Any:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.jobs.maxsize} requests are waiting in this instance") from None
        self.metrics.queue_depth.set(self.jobs.qsize())
        return job.future

    def stop(self) -> None:
        """Finish the queued jobs, then stop the worker (and the peers)."""
        self.jobs.put(None)
        self.worker.join()

    # --- the worker thread (rank 0) --------------------------------------------------------

    def _next(self, timeout: float | None) -> Job | None:
        if self.held:
            return self.held.popleft()
        return self.jobs.get(timeout=timeout)

    def _batch(self, first: Job) -> list[Job]:
        """`first` and the waiting jobs that can join it, up to max_batch images."""
        batch, images = [first], first.request.n
        waiting = []
        while True:
            try:
                job = self._next(None) if self.held else self.jobs.get_nowait()
            except queue.Empty:
                break
            if (job is not None and job.batch_key() == first.batch_key()
                    and images + job.request.n <= self.max_batch):
                batch.append(job)
                images += job.request.n
            else:
                waiting.append(job)
                if job is None:
                    break
        self.held.extendleft(reversed(waiting))
        return batch

    def _work(self) -> None:
        while True:
            try:
                first = self._next(PING_S)
            except queue.Empty:  # idle: show the peers rank 0 is alive (their wait ends)
                self._tell_peers(PING)
                continue
            if first is None:  # stop
                self._tell_peers(STOP)
                return
            jobs = [j for j in self._batch(first) if self._starts(j)]
            self.metrics.queue_depth.set(self.jobs.qsize() + len(self.held))
            if not jobs:
                continue
            self.running = jobs
            self.metrics.in_flight.set(len(jobs))
            try:
                self._tell_peers([j.spec() for j in jobs])
                for job, images in zip(jobs, self.run(jobs)):
                    job.future.set_result(images)
            except Exception as err:  # the batch's failure is its answer; the worker goes on
                if is_out_of_memory(err):
                    self.metrics.oom.labels(stage=stage_now()).inc()
                for job in jobs:
                    job.future.set_exception(err)
            finally:
                self.running = []
                self.metrics.in_flight.set(0)
                self.metrics.record_devices([devices.sample(self.device, 0)])

    @staticmethod
    def _starts(job: Job) -> bool:
        if job.cancelled.is_set():  # gone before it started
            job.future.cancel()
        return bool(job.future.set_running_or_notify_cancel())

    def _tell_peers(self, message: object) -> None:
        """Hand `message` to the peers (an all-gather: they read rank 0's); what they send back
        is their device's sample, so rank 0 exports every rank's device. Idle, every PING_S."""
        samples = [devices.sample(self.device, 0)]
        if self.ctx.world_size > 1:
            samples += self.ctx.comm.gather_objects(message)[1:]
        self.metrics.record_devices(samples)

    def follow(self) -> None:
        """A peer rank: run what rank 0 hands over, until it says stop."""
        while True:
            mine = devices.sample(self.device, self.ctx.rank)
            message = self.ctx.comm.gather_objects(mine)[0]
            if message == STOP:
                return
            if message == PING:
                continue
            assert isinstance(message, list)
            try:
                self.run([Job.from_spec(spec) for spec in message])
            except Cancelled:
                pass

    # --- every rank ------------------------------------------------------------------------

    def run_config(self, job: Job, inputs: dict[str, str] | None = None) -> DictConfig:
        """The run config of `job`; an edit's names its files, `inputs` (Job.inputs)."""
        r = job.request
        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.prompt, cfg.negative_prompt = r.prompt, r.negative_prompt
            cfg.images_per_prompt, cfg.steps = r.n, r.steps
            cfg.guidance_scale, cfg.seed = r.guidance_scale, job.seed
            cfg.lora = [OmegaConf.structured(AdapterChoice(c.name, c.scale)) for c in r.lora]
            cfg.height, cfg.width = job.height, job.width
            if job.uploads is not None:
                if not inputs:
                    raise ValueError("an edit's run config needs its files (Job.inputs)")
                kind = "img2img" if job.uploads.mask is None else "inpaint"
                cfg.pipeline = self.edits[kind].copy()
                cfg.image, cfg.mask = inputs["image"], inputs.get("mask")
                cfg.strength = getattr(r, "strength", None)
                cfg.denoising_end = None  # the instance's hand-over (sdxl_refine), not read
            cfg.pipeline.progress = False
        return cfg

    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        """One batch of jobs alike (Job.batch_key): each job's PNGs (on rank 0; [] elsewhere)."""
        lead = jobs[0]
        self.pipe.scheduler = self.schedulers[lead.request.scheduler or self.default_scheduler]
        prompts: list[str] = []
        seeds: dict[int, int] = {}
        owner: list[int] = []
        for j, job in enumerate(jobs):
            for k in range(job.request.n):
                seeds[len(prompts)] = job.seed + k
                prompts.append(job.request.prompt)
                owner.append(j)
        with lead.inputs() as inputs:  # an edit's files, removed however it ends
            done = self.session.generate(self.run_config(lead, inputs), prompts,
                                         services={SERVICE: self.cache, SEEDS: seeds},
                                         on_step=self._on_step(jobs))
        gathered = done.sink
        if not self.ctx.is_main:
            return [[] for _ in jobs]
        self.metrics.images.inc(len(prompts))
        self.metrics.batches.inc()
        calls = done.env.denoiser_calls  # a step cache's hits (paraflow/cache)
        self.metrics.denoiser_calls.inc(calls.full)
        self.metrics.reused_steps.inc(len(calls.reused))
        return [[png(gathered.images[i]) for i in range(len(prompts)) if owner[i] == j]
                for j in range(len(jobs))]

    def _on_step(self, jobs: list[Job]) -> Any:
        delay = float(os.environ.get(SLOW_ENV, "0"))  # an injected slow device (routing tests)

        def on_step(done: int, of: int) -> None:
            if delay > 0:
                time.sleep(delay)
            self.metrics.steps.inc()
            for job in jobs:
                if job.on_progress is not None and not job.cancelled.is_set():
                    job.on_progress({"step": done, "steps": of, "images": job.request.n})
            if self._stop_here(jobs):
                raise Cancelled(f"cancelled after step {done} of {of}")

        return on_step

    def _stop_here(self, jobs: list[Job]) -> bool:
        """Whether to stop after this step: every job of the batch cancelled on rank 0, agreed
        by every rank (they must leave the step loop together)."""
        gone = all(job.cancelled.is_set() for job in jobs)
        if self.ctx.world_size == 1:
            return gone
        flag = torch.tensor([1.0 if gone else 0.0], device=self.device)
        return bool(self.ctx.comm.all_reduce(flag).item() > 0)
