"""An instance's Prometheus metrics (prometheus_client, one registry per instance so several
apps can live in one process). Rates (images/s, steps/s) are Prometheus' rate() over the
counters; the front door's queue and check metrics come from HAProxy's own exporter."""

from __future__ import annotations

import os

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class InstanceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("paraflow_queue_depth", "requests waiting in this instance",
                                 registry=r)
        self.in_flight = Gauge("paraflow_in_flight", "requests being generated", registry=r)
        self.latency = Histogram("paraflow_request_seconds", "accepted request to answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("paraflow_images", "images generated", registry=r)
        self.steps = Counter("paraflow_denoise_steps", "denoising steps run", registry=r)
        self.batches = Counter("paraflow_batches", "batches run (requests alike run as one)",
                               registry=r)
        self.cache = Counter("paraflow_embedding_cache", "prompt embedding lookups",
                             ["result", "where"], registry=r)
        self.redis = Gauge("paraflow_redis_up", "1 while the shared Redis cache answers",
                           registry=r)
        self.errors = Counter("paraflow_errors", "requests that failed, by kind", ["kind"],
                              registry=r)
        self.device_memory = Gauge("paraflow_device_memory_bytes",
                                   "memory allocated on the instance's device", registry=r)
        self.gpu_utilization = Gauge("paraflow_gpu_utilization_percent",
                                     "GPU busy time over NVML's last sample period (CUDA only)",
                                     registry=r)

    def cache_event(self, result: str, where: str) -> None:
        self.cache.labels(result=result, where=where).inc()

    def redis_up(self, up: bool) -> None:
        self.redis.set(1 if up else 0)

    def sample_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.device_memory.set(torch.cuda.memory_allocated(device))
            try:  # torch asks NVML (nvidia-ml-py, in the serve extra)
                self.gpu_utilization.set(torch.cuda.utilization(device))
            except Exception:  # no NVML on this host: leave the gauge unset, never fail a request
                pass
        else:  # the process' resident set now (Linux), the CPU "device"'s memory
            try:
                pages = int(open("/proc/self/statm").read().split()[1])
            except OSError:
                return
            self.device_memory.set(pages * os.sysconf("SC_PAGE_SIZE"))
