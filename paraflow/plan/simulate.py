"""One rank's generation replayed on the meta device to find its peak working memory.

The strategy's own code runs: patch layers, band hooks, stale buffers and asynchronous buckets
(strategies/patch), the guidance split, and the patch VAE decode, over `PlannedComm` — a
communicator that moves nothing but returns the fresh tensors a real collective would. Tensor
parallelism is applied by slicing the meta modules as each rank holds them. `LiveBytes` counts
every tensor alive at each op; the scheduler step is stood in for by two latent-sized ops, and the
images' post-processing by the float and uint8 copies it makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn

from paraflow.adapters import context_width, set_attention_heads
from paraflow.context import ParallelContext
from paraflow.plan.layout import Role
from paraflow.plan.live import LiveBytes
from paraflow.plan.planned import PlannedComm
from paraflow.strategies.patch.state import PatchState
from paraflow.strategies.patch.strategy import PatchParallel, batch_groups
from paraflow.strategies.patch.unet import Layout as BandLayout
from paraflow.strategies.patch.vae import patch_decode
from paraflow.strategies.tensor import PlannedSplit
from paraflow.strategies.tensor_layers import (
    InputShardedConv2d,
    interleave_gated,
    shard_conv_out,
    shard_group_norm,
)


@dataclass
class Inputs:
    """What the denoiser and the decoder are called with (shapes of the real run)."""

    latent: tuple[int, int, int]  # C, h, w
    tokens: int
    guidance: bool
    added: dict[str, int] | None  # SDXL: text_embeds width, time_ids width


def shard_on_meta(model: nn.Module, splits: list[PlannedSplit], n: int) -> None:
    """Rank 0's slice of every planned layer (strategies/tensor.py apply_plan without DTensor:
    linears sliced by hand, the rest with the strategy's own functions)."""
    modules = dict(model.named_modules())
    for split in splits:
        module = modules[split.name]
        if split.style in ("colwise", "colwise_gated"):
            linear = cast(nn.Linear, module)
            if split.style == "colwise_gated":
                interleave_gated(linear, n)
            keep = linear.out_features // n
            linear.weight = nn.Parameter(linear.weight[:keep])
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias[:keep])
            linear.out_features = keep
        elif split.style == "rowwise":
            linear = cast(nn.Linear, module)
            linear.weight = nn.Parameter(linear.weight[:, : linear.in_features // n])
            linear.in_features //= n
        elif split.style == "heads":
            set_attention_heads(module, split.count // n)
        elif split.style == "conv_out":
            shard_conv_out(cast(nn.Conv2d, module), n, 0)
        elif split.style == "groupnorm":
            shard_group_norm(cast(nn.GroupNorm, module), n, 0)
        else:
            parent, _, child = split.name.rpartition(".")
            setattr(modules[parent] if parent else model, child,
                    InputShardedConv2d.from_conv(cast(nn.Conv2d, module), n, 0, lambda t: t))


def install_patch(strategy: PatchParallel, role: Role, unet: nn.Module) -> None:
    """PatchParallel.setup and parallelize for `role`, over planned communicators."""
    groups = batch_groups(role.replica, strategy.cfg_split)
    strategy.state = PatchState(PlannedComm(len(role.bands), role.band),
                                displaced=strategy.displaced, warmup_steps=strategy.warmup_steps,
                                frozen=strategy.frozen, groupnorm=strategy.groupnorm,
                                bucket_bytes=strategy.bucket_bytes)
    replica = PlannedComm(role.replica, role.replica_rank)
    strategy.layout = BandLayout(replica, groups, 1)
    strategy._image_comm = replica
    strategy.parallelize(SimpleNamespace(unet=unet), _context(role))


def _context(role: Role) -> ParallelContext:
    return ParallelContext(role.rank, role.replica, 0, torch.device("meta"),
                           PlannedComm(role.replica, role.replica_rank))


def steps_to_replay(strategy: Any, steps: int) -> list[int]:
    """The steps whose memory differs: the last synchronous one (displaced: it keeps the other
    bands' pieces) and the first displaced one (stale buffers plus buckets in flight)."""
    if not getattr(strategy, "displaced", False):
        return [0]
    last_sync = min(int(strategy.warmup_steps), steps - 1)
    return [last_sync] + ([last_sync + 1] if last_sync + 1 < steps else [])


def replay(strategy: Any, role: Role, unet: Any, vae: Any, inputs: Inputs,
           images: int, steps: int, patch_decode_over: int, cpu: bool,
           ctx: ParallelContext | None = None) -> tuple[int, int]:
    """Peak live bytes (denoising, then decoding) of one pass of `images` images through the
    meta `unet` and `vae` as `strategy` runs them on this rank; patch decode over
    `patch_decode_over` ranks (1: whole); `cpu`: CPU convolution workspace (live.py). `ctx`
    (default: the role's): its communicator books each replayed step's bytes under the step."""
    ctx = ctx or _context(role)
    unet_dtype = next(unet.parameters()).dtype
    vae_dtype = next(vae.parameters()).dtype
    weights = [*unet.parameters(), *unet.buffers(), *vae.parameters(), *vae.buffers()]
    live = LiveBytes(exclude=weights, cpu_convolutions=cpu)
    batch = images * (2 if inputs.guidance else 1)
    meta = torch.device("meta")
    with torch.inference_mode(), live:
        embeds = torch.empty(batch, inputs.tokens, context_width(unet),
                             dtype=unet_dtype, device=meta)
        added = None if inputs.added is None else {
            k: torch.empty(batch, width, dtype=unet_dtype, device=meta)
            for k, width in inputs.added.items()}
        initial = torch.empty(images, *inputs.latent, device=meta)  # kept by the stage graph
        latents = initial * 1.0
        t = torch.tensor(500, device=meta)
        for step in steps_to_replay(strategy, steps):
            ctx.comm.step = step
            strategy.on_step(step, ctx)
            model_input = torch.cat([latents] * 2) if inputs.guidance else latents
            noise = unet(model_input.to(unet_dtype), t, encoder_hidden_states=embeds,
                         added_cond_kwargs=added, return_dict=False)[0].float()
            if inputs.guidance:
                uncond, text = noise.chunk(2)
                noise = uncond + 5.0 * (text - uncond)
            latents = latents * 0.5 + noise * 0.5  # the scheduler step: latent-sized temporaries
            del model_input, noise
        ctx.comm.step = None
        strategy.on_denoise_end(ctx)  # as the Denoise stage calls it
        denoise = live.peak
        live.reset_peak()
        scaled = latents.to(vae_dtype) / 0.5
        if patch_decode_over > 1:
            decoded = patch_decode(vae, scaled, PlannedComm(patch_decode_over, role.replica_rank))
        else:
            decoded = vae.decode(scaled, return_dict=False)[0]
        pixels = (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        rounded = (pixels * 255).round()  # pixels_to_uint8's copies
        _ = rounded.to(torch.uint8)
        return denoise, live.peak
