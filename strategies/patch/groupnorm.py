"""PatchGroupNorm: GroupNorm over the whole image while each rank holds one band.

Split: the spatial positions (rows, or tokens). Communicated: per (sample, group) the band's
sum and sum of squares (float64), all-gathered, so the mean and variance are the whole image's.
After warm-up of displaced patch parallelism the statistics follow `GroupNormMode`:
corrected_async uses the previous step's global sums plus this band's (fresh − previous) sums,
falling back to this band's own statistics where the estimated variance is negative.
"""

from __future__ import annotations

import torch
from torch import nn

from strategies.patch.state import GroupNormMode, PatchState


class PatchGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, state: PatchState, key: str) -> None:
        super().__init__()
        self.norm, self.state, self.key = norm, state, key
        self.previous_sums: torch.Tensor | None = None  # this band's, for groupnorm=stale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, norm = self.state, self.norm
        groups = norm.num_groups
        grouped = x.reshape(x.shape[0], groups, -1)
        if grouped.dtype not in (torch.float32, torch.float64):
            grouped = grouped.float()  # squares of half values overflow
        # float64 accumulation without a float64 copy of the activation
        sums = torch.stack([grouped.sum(-1, dtype=torch.float64),
                            (grouped * grouped).sum(-1, dtype=torch.float64)], dim=-1)  # (B,G,2)
        counts = state.band.scaled(x[0, 0].numel())  # positions per band (rows × width scale)
        per_group = x.shape[1] // groups
        total = sum(counts) * per_group
        mode = GroupNormMode.sync if state.synchronous else state.groupnorm
        if mode is GroupNormMode.sync:
            pieces = state.gather(self.key, sums) if state.comm.world_size > 1 else [sums]
            moments = torch.stack(pieces).sum(0) / total
        elif mode is GroupNormMode.separate:
            moments = sums / grouped.shape[-1]
        else:
            # The other bands' previous sums plus this band's fresh (corrected) or previous ones.
            own = self.previous_sums if mode is GroupNormMode.stale else None
            own = sums if own is None else own
            moments = torch.stack(state.stale(self.key, own)).sum(0) / total
        mean, var = moments[..., 0], moments[..., 1] - moments[..., 0] ** 2
        if mode is GroupNormMode.corrected_async:
            local = sums / grouped.shape[-1]
            bad = var < 0
            mean = torch.where(bad, local[..., 0], mean)
            var = torch.where(bad, local[..., 1] - local[..., 0] ** 2, var)
        if mode in (GroupNormMode.stale, GroupNormMode.corrected_async) and not state.synchronous:
            state.publish(self.key, sums)
        if state.synchronous or not state.frozen:
            self.previous_sums = sums
        return self._normalize(x, mean, var.clamp_min(0))

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """(x − mean)/√(var + eps)·weight + bias as ONE pass over x: the per-(sample, channel)
        scale and shift are folded from the (B, G) statistics first."""
        norm = self.norm
        per_group = x.shape[1] // norm.num_groups
        scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, 1)  # (B, C)
        shift = -mean.repeat_interleave(per_group, 1) * scale
        if norm.affine:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        shape = (*scale.shape, *(1,) * (x.dim() - 2))
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))
