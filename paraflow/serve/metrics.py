"""An instance's Prometheus metrics (prometheus_client, one registry per instance so several
apps can live in one process). Rates (images/s, steps/s) are Prometheus' rate() over the
counters; the front door's queue and check metrics come from HAProxy's own exporter. Each
rank's device (paraflow/devices.py) is labelled by rank and device; deploy/prometheus holds the
scrape config, alert rules and their tests."""

from __future__ import annotations

from typing import Any

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
        self.denoiser_calls = Counter("paraflow_denoiser_calls", "full denoiser calls (rank 0)",
                                      registry=r)
        self.reused_steps = Counter("paraflow_reused_steps",
                                    "denoising steps a step cache answered (rank 0)", registry=r)
        self.warmup = Gauge("paraflow_warmup_seconds", "the start-up request, compilation "
                            "included (before /readyz answers)", registry=r)
        self.batches = Counter("paraflow_batches", "batches run (requests alike run as one)",
                               registry=r)
        self.cache = Counter("paraflow_embedding_cache", "prompt embedding lookups",
                             ["result", "where"], registry=r)
        self.redis: Gauge | None = None  # only where a Redis cache is configured (redis_up)
        self.errors = Counter("paraflow_errors", "requests that failed, by kind", ["kind"],
                              registry=r)
        device = ["rank", "device"]  # a rank group's instance exports each rank's device
        self.device_memory = Gauge("paraflow_device_memory_bytes",
                                   "memory in use on the device (CUDA: reserved by the "
                                   "allocator; CPU: the rank's resident set)", device, registry=r)
        self.device_memory_limit = Gauge("paraflow_device_memory_limit_bytes",
                                         "the device's memory in all", device, registry=r)
        self.device_utilization = Gauge("paraflow_device_utilization_percent",
                                        "GPU busy time over NVML's last sample period",
                                        device, registry=r)
        self.device_temperature = Gauge("paraflow_device_temperature_celsius",
                                        "GPU die temperature (NVML)", device, registry=r)
        self.device_power = Gauge("paraflow_device_power_watts", "GPU board power draw (NVML)",
                                  device, registry=r)
        self.device_throttled = Gauge("paraflow_device_throttled",
                                      "1 while NVML reports this reason holding the clocks down",
                                      [*device, "reason"], registry=r)
        self.oom = Counter("paraflow_oom", "out-of-memory failures, by the stage that ran out",
                           ["stage"], registry=r)

    def cache_event(self, result: str, where: str) -> None:
        self.cache.labels(result=result, where=where).inc()

    def redis_up(self, up: bool) -> None:
        if self.redis is None:
            self.redis = Gauge("paraflow_redis_up", "1 while the shared Redis cache answers",
                               registry=self.registry)
        self.redis.set(1 if up else 0)

    def record_devices(self, samples: list[dict[str, Any]]) -> None:
        """Every rank's device sample (devices.sample); a reading a sample lacks stays unset."""
        gauges = {"memory": self.device_memory, "memory_limit": self.device_memory_limit,
                  "utilization": self.device_utilization,
                  "temperature": self.device_temperature, "power": self.device_power}
        for reading in samples:
            labels = {"rank": str(reading["rank"]), "device": str(reading["device"])}
            for key, gauge in gauges.items():
                if key in reading:
                    gauge.labels(**labels).set(reading[key])
            for reason, active in reading.get("throttled", {}).items():
                self.device_throttled.labels(**labels, reason=reason).set(active)
