"""Attention backends: `attention.backend=NAME`, one choice for every attention a run computes.

- `sdpa` (the default): torch's scaled_dot_product_attention, which picks its kernel itself.
- `sdpa_math`, `sdpa_flash`, `sdpa_efficient`, `sdpa_cudnn`: torch's SDPA held to one kernel
  (`torch.nn.attention.sdpa_kernel`). Every attention goes through torch's SDPA in the end —
  diffusers' stock processors, paraflow's band and Ulysses processors — so these reach all of
  them, every family and strategy. The three fast kernels need a CUDA device.
- diffusers' dispatch backends (`flash` from flash-attn, `sage`, `xformers`, `flex`, ...):
  paraflow's own processors call them through `attend`, and diffusers' processors that dispatch
  (Flux's) follow diffusers' active backend, set here; stock processors that call torch's SDPA
  directly (AttnProcessor2_0: UNets and PixArt on one device; SD3's joint one) keep torch's
  kernel there. A backend whose package is not installed is refused before launch, as are
  the hub backends (they download kernels at run time, which paraflow never does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from paraflow.errors import ParaflowError

SDPA = "sdpa"
TORCH_KERNELS = {"sdpa_math": SDPBackend.MATH, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
CPU_KERNELS = (SDPA, "sdpa_math", "native", "_native_math")  # the rest need CUDA
_active = SDPA  # the session's backend (one per process: a rank runs one session's config)


def _dispatch_backends() -> list[str]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    names = (str(getattr(b, "value", b)) for b in _AttentionBackendRegistry._backends)
    return sorted(n for n in names if not n.endswith("_hub"))


def backends() -> list[str]:
    """Every name attention.backend takes."""
    return [SDPA, *TORCH_KERNELS, *_dispatch_backends()]


def check_backend(name: str, accelerator: str | None) -> None:
    """Pre-launch: a backend that exists, is installed and runs on this run's accelerator
    (None: planning for another machine, so only the name is checked)."""
    key = f"attention.backend={name}"
    if name.endswith("_hub"):
        raise ParaflowError(f"{key}: hub backends download kernels at run time, which paraflow "
                            "does not do; install the package and name its backend")
    if name not in backends():
        raise ParaflowError(f"{key}: one of {', '.join(backends())}")
    if accelerator is None:
        return
    if accelerator == "cpu" and name not in CPU_KERNELS:
        raise ParaflowError(f"{key} needs a CUDA device and this run's accelerator is cpu; on "
                            f"CPU use one of {', '.join(CPU_KERNELS)}")
    if name not in (SDPA, *TORCH_KERNELS):
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
        )
        try:
            _check_attention_backend_requirements(AttentionBackendName(name))
        except RuntimeError as error:  # diffusers names the package to install
            raise ParaflowError(f"{key}: not installed ({error})") from None


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Every attention inside uses backend `name` (a generation runs inside)."""
    global _active
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before, before_diffusers = _active, _AttentionBackendRegistry._active_backend
    _active = name
    try:
        if name in TORCH_KERNELS:
            with sdpa_kernel([TORCH_KERNELS[name]]):
                yield
        elif name == SDPA:
            yield
        else:
            _AttentionBackendRegistry.set_active_backend(name)
            yield
    finally:
        _active = before
        _AttentionBackendRegistry.set_active_backend(before_diffusers)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention of (B, heads, tokens, dim) queries over keys/values, on the active backend:
    torch's SDPA (its kernel chosen by `attention_backend`) or diffusers' dispatch."""
    if _active == SDPA or _active in TORCH_KERNELS:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                              scale=scale)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out: Any = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2),
                                     value.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # type: ignore[no-any-return]


def attend_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention (B, heads, tokens, dim) and the log-sum-exp of each query's scores (B, heads,
    tokens, fp32), what ring attention merges partial results by. torch's fused kernels that
    return it: flash on the CPU, memory-efficient on CUDA; the math elsewhere (and the meta
    device: shapes only). The dispatch backends of `attention.backend` do not apply here."""
    if query.device.type == "meta":  # the planner: torch's SDPA is what its FLOP count sees
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        return F.scaled_dot_product_attention(query, key, value, scale=scale), lse
    if query.device.type == "cpu" and query.shape[-1] == value.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, scale=scale)
        return out, lse
    if query.device.type == "cuda":
        found = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, scale=scale)
        return found[0], found[1][..., : query.shape[2]]  # the kernel pads the tokens
    scores = (query.float() @ key.float().transpose(-1, -2)) * (
        scale if scale is not None else query.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ value.float()
    return out.to(query.dtype), lse
