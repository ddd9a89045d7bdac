"""The `serve` config group's schema (conf/serve/local.yaml): the instances, the front door
(HAProxy), the caches and the limits every request is checked against. Registered through the
entry-point group `paraflow.configs`, as a strategy's schema is, so core config never imports the
service (dataclasses only: loaded whenever a config composes, without the `serve` extra)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from paraflow.config import AdapterConfig


@dataclass
class InstanceConfig:
    devices: int = 1  # ranks per instance (1: one device)
    host: str = "127.0.0.1"
    port: int = 8101  # the instance command's port; the supervisor gives instance i base_port + i
    base_port: int = 8101
    max_queue: int = 8  # requests waiting inside one instance; beyond it answers 429
    warmup: bool = True  # one small generation before the instance says it is ready


@dataclass
class LimitsConfig:
    max_images: int = 4  # `n` per request
    max_steps: int = 100
    max_side: int = 1024  # pixels; the smallest side and the multiple come from the model
    max_prompt_chars: int = 2000
    max_body_bytes: int = 65536  # a generation's JSON
    max_upload_bytes: int = 16 << 20  # an edit's multipart body (its image and mask)
    schedulers: list[str] = field(default_factory=lambda: ["ddim", "dpm", "euler"])


@dataclass
class CacheConfig:
    embeddings: int = 512  # prompt embeddings kept in each instance's LRU (0: none)
    redis_url: str | None = None  # shared by every instance and machine, e.g. redis://127.0.0.1:6379/0
    redis_ttl_s: int = 86400


@dataclass
class FrontConfig:
    """HAProxy in front of the instances (paraflow/serve/haproxy.py writes its config)."""

    host: str = "127.0.0.1"
    port: int = 8100
    stats_port: int = 8404  # HAProxy's Prometheus exporter (/metrics) and stats page (/stats)
    max_queue: int = 32  # requests waiting for a free instance; beyond it clients get 429
    retry_after_s: int = 2
    timeout_s: float = 600.0  # the longest a request may take, queue included
    check_interval_ms: int = 500
    binary: str = "haproxy"


@dataclass
class LargeConfig:
    """Instances for large images, routed by size: rank groups, where latency, not throughput,
    is what the user waits on. Requests of min_pixels (width × height) or more go to them."""

    count: int = 0  # 0: none; every request goes to the serve.instance kind
    devices: int = 2  # ranks per large instance
    min_pixels: int = 262144  # 512 × 512
    overrides: list[str] = field(default_factory=lambda: ["+strategy=distrifusion"])
    base_port: int = 8151


@dataclass
class ServeConfig:
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    large: LargeConfig = field(default_factory=LargeConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    front: FrontConfig = field(default_factory=FrontConfig)
    remote: list[str] = field(default_factory=list)  # host:port of instances on other machines
    # LoRA adapters every instance loads, off until a request names them (adapters.py).
    lora: list[AdapterConfig] = field(default_factory=list)
    api_key: str | None = None  # clients send `Authorization: Bearer KEY`; None: open
    restart_backoff_s: float = 0.5  # first wait before restarting a crashed instance (doubles)
    restart_backoff_max_s: float = 10.0
    ready_timeout_s: float = 300.0  # an instance not ready by then is restarted


def register(store: Any) -> None:
    """The schema under `schemas/serve/serve` of Hydra's ConfigStore `store`."""
    store.store(group="schemas/serve", name="serve", node=ServeConfig)
