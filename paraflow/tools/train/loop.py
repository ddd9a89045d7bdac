"""The parts every training phase shares: a step loop with warm-up + cosine learning rate,
gradient clipping, an EMA copy, a progress bar, a CSV loss log and resumable checkpoints.

Batches are a pure function of (seed, phase, step), so a resumed run sees exactly the batches the
uninterrupted run would have, and two runs with one seed give the same loss curve.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

CHECKPOINT = "checkpoint.pt"


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The random stream of one step of one phase."""
    offset = {"vae": 1, "unet": 2}[phase]
    return torch.Generator().manual_seed(seed * 1_000_003 + offset * 100_000_007 + step)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Ema:
    """An exponential moving average of a module's weights, warmed up so early steps count."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, source: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for mine, theirs in zip(self.module.parameters(), source.parameters()):
            mine.lerp_(theirs, 1 - decay)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write whole or not at all: a crash mid-write leaves the previous checkpoint."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def run_steps(phase: str, steps: int, start: int, step_fn: Callable[[int], float],
              log: Path, checkpoint: Callable[[int], None], every: int,
              stop_after: int | None = None) -> bool:
    """Call `step_fn(step)` for steps start..steps-1, logging losses and checkpointing; with
    `stop_after`, checkpoint and stop there instead. True when the phase is complete."""
    end = steps if stop_after is None else min(steps, stop_after)
    new_log = not log.exists()
    with log.open("a") as out, tqdm(desc=phase, initial=start, total=steps,
                                    dynamic_ncols=True) as bar:
        if new_log:
            out.write("phase,step,loss,seconds\n")  # seconds: wall time since this launch
        began = time.perf_counter()
        for step in range(start, end):
            loss = step_fn(step)
            out.write(f"{phase},{step},{loss:.6f},{time.perf_counter() - began:.1f}\n")
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            if (step + 1) % every == 0 or step + 1 == end:
                out.flush()
                checkpoint(step + 1)
    return end == steps
