"""Prompt embeddings computed once: an in-process LRU, and Redis shared by every instance.

The key holds everything the embedding depends on: the model, its text encoder(s) and their
dtype, guidance on/off (which adds the negative branch), the negative prompt, the image size
(SDXL's micro-conditioning rides with the pooled embeddings) and the prompt. A Redis that is
down is skipped (counted, and tried again later), so the service keeps working without it.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any

import torch
from safetensors.torch import load, save

from paraflow.families import Conditioning, denoiser_call
from paraflow.graph import StageEnv
from paraflow.models.components import TEXT_ENCODERS
from paraflow.stages.encode import EncodePrompt

SERVICE = "embeddings"  # the StageEnv.services name of the cache
RETRY_REDIS_S = 5.0


def _pack(cond: Conditioning) -> bytes:
    tensors = {"embeds": cond.embeds.cpu().contiguous()}
    tensors.update({f"added.{k}": v.cpu().contiguous() for k, v in (cond.added or {}).items()})
    return save(tensors)


def _unpack(data: bytes) -> Conditioning:
    tensors = load(data)
    added = {k.removeprefix("added."): v for k, v in tensors.items() if k.startswith("added.")}
    return Conditioning(tensors["embeds"], added or None)


class EmbeddingCache:
    """Conditioning of one prompt (batch 2 with guidance: [negative, prompt]) by key."""

    def __init__(self, capacity: int, redis_url: str | None = None, ttl_s: int = 86400,
                 counters: Any = None) -> None:
        self.capacity, self.ttl_s = capacity, ttl_s
        self.local: OrderedDict[str, Conditioning] = OrderedDict()
        self.counters = counters  # paraflow.serve.metrics.InstanceMetrics, or None
        self.redis: Any = None
        self._redis_down_until = 0.0
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=1.0,
                                              socket_connect_timeout=1.0)
            if counters is not None:  # exported only where Redis is configured; up until
                counters.redis_up(True)  # a call fails

    def _count(self, event: str, where: str) -> None:
        if self.counters is not None:
            self.counters.cache_event(event, where)

    def get(self, key: str) -> Conditioning | None:
        found = self.local.get(key)
        if found is not None:
            self.local.move_to_end(key)
            self._count("hit", "local")
            return found
        data = self._redis_call(lambda r: r.get(key))
        if data is not None:
            self._count("hit", "redis")
            found = _unpack(data)
            self._keep(key, found)
            return found
        self._count("miss", "redis" if self.redis is not None else "local")
        return None

    def put(self, key: str, value: Conditioning) -> None:
        self._keep(key, value)
        self._redis_call(lambda r: r.set(key, _pack(value), ex=self.ttl_s))

    def _keep(self, key: str, value: Conditioning) -> None:
        if self.capacity <= 0:
            return
        self.local[key] = value
        self.local.move_to_end(key)
        while len(self.local) > self.capacity:
            self.local.popitem(last=False)

    def _redis_call(self, call: Any) -> Any:
        if self.redis is None or time.monotonic() < self._redis_down_until:
            return None
        try:
            result = call(self.redis)
        except Exception:  # down, refused, timed out: work on without the shared cache
            self._redis_down_until = time.monotonic() + RETRY_REDIS_S
            if self.counters is not None:
                self.counters.redis_up(False)
            return None
        if self.counters is not None:
            self.counters.redis_up(True)
        return result


def embedding_key(env: StageEnv, prompt: str, guidance: bool) -> str:
    cfg, pipe = env.cfg, env.pipe
    encoders = [getattr(pipe, n, None) for n in TEXT_ENCODERS]
    names = [f"{type(e).__name__}:{getattr(e.config, '_name_or_path', '')}" for e in encoders
             if e is not None]
    parts = [str(cfg.model.name), *names, str(env.dtype), str(guidance),
             repr(cfg.negative_prompt), f"{cfg.height}x{cfg.width}",
             f"clip_skip={cfg.get('clip_skip')}", repr(cfg.get("sdxl")),
             prompt]
    return "paraflow:emb:" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def split_rows(cond: Conditioning, n: int, guidance: bool) -> list[Conditioning]:
    """Per prompt: rows [i] (and [n + i], the negative branch, first) of every tensor."""
    def rows(tensor: torch.Tensor, i: int) -> torch.Tensor:
        return torch.stack([tensor[i], tensor[n + i]]) if guidance else tensor[i:i + 1]

    return [Conditioning(rows(cond.embeds, i),
                         {k: rows(v, i) for k, v in cond.added.items()} if cond.added else None)
            for i in range(n)]


def join_rows(parts: list[Conditioning], guidance: bool) -> Conditioning:
    """The batch [negatives..., prompts...] (guidance) or [prompts...] from per-prompt parts."""
    def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not guidance:
            return torch.cat(tensors)
        return torch.cat([t[:1] for t in tensors] + [t[1:] for t in tensors])

    added = None
    if parts[0].added:
        added = {k: joined([p.added[k] for p in parts if p.added]) for k in parts[0].added}
    return Conditioning(joined([p.embeds for p in parts]), added)


class CachedEncodePrompt(EncodePrompt):
    """EncodePrompt through the service's cache (StageEnv.services['embeddings']): the text
    encoders run only for prompts not seen before, once for all of them."""

    def __call__(self, env: StageEnv, prompts: list[str]) -> dict[str, Any]:
        cache: EmbeddingCache | None = env.services.get(SERVICE)
        if cache is None:
            return super().__call__(env, prompts)
        cfg = env.cfg
        call = denoiser_call(env.pipe)
        guidance = call.family.uses_guidance(call.model.config, cfg.guidance_scale)
        keys = [embedding_key(env, p, guidance) for p in prompts]
        found = {k: cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            texts = [prompts[keys.index(k)] for k in missing]
            fresh = self.encode(env, texts, guidance)
            for key, part in zip(missing, split_rows(fresh, len(texts), guidance)):
                cache.put(key, part)
                found[key] = part
        parts = [found[k] for k in keys]
        joined = join_rows([p for p in parts if p is not None], guidance)
        return {"conditioning": joined.to(env.device, joined.embeds.dtype)}

