"""PatchGroupNorm: GroupNorm over the whole image while each rank holds one band.

Split: the spatial positions (rows, or tokens). Communicated: per (sample, group) the band's
sum and sum of squares (float64), all-gathered, so the mean and variance are the whole image's.
After warm-up of displaced patch parallelism the statistics follow `GroupNormMode`
(`estimate_moments` has the formulas); the fresh sums travel asynchronously for the next step.
"""

from __future__ import annotations

import torch
from torch import nn

from paraflow.strategies.patch.state import GroupNormMode, PatchState


def estimate_moments(mode: GroupNormMode, stale: list[torch.Tensor], fresh: torch.Tensor,
                     own_stale: torch.Tensor, index: int, counts: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's whole-image (mean, variance) per (sample, group) from the bands' sums.

    `stale[r]`: band r's (sum, sum of squares) at the previous step (this band's slot is not
    read), `fresh`: this band's now, `own_stale`: this band's previous sums, `counts[r]`: band
    r's elements per group. With E = sum / count, the previous step's global moments are
    Eg' = (Σ_{r≠me} stale_r + own_stale) / Σ counts, and:

      corrected_async (the paper): E[x], E[x²] = Eg' + (E_local − E_local'), the whole change
          seen in this band added to the previous global moments. Where the variance
          E[x²] − E[x]² comes out negative, the corrected mean is kept and this band's own
          variance used; that one is never negative but for rounding, which is clamped to 0.
      weighted: (Σ_{r≠me} stale_r + fresh) / Σ counts = Eg' + (E_local − E_local')·count_me/Σ
          (the DistriFusion code's `stale_gn`: the correction scaled by the band's share).
      stale: Eg', the previous step's global moments (this band's previous sums too).
    """
    total = sum(counts)
    others = torch.stack([s for r, s in enumerate(stale) if r != index]).sum(0)
    if mode is GroupNormMode.stale:
        moments = (others + own_stale) / total
    elif mode is GroupNormMode.weighted:
        moments = (others + fresh) / total
    elif mode is GroupNormMode.corrected_async:
        moments = (others + own_stale) / total + (fresh - own_stale) / counts[index]
    else:
        raise ValueError(f"estimate_moments: {mode.value} uses no previous statistics")
    mean, var = moments[..., 0], moments[..., 1] - moments[..., 0] ** 2
    if mode is GroupNormMode.corrected_async:
        local = fresh / counts[index]
        var = torch.where(var < 0, local[..., 1] - local[..., 0] ** 2, var)
    return mean, var.clamp_min(0)


class PatchGroupNorm(nn.Module):
    def __init__(self, norm: nn.GroupNorm, state: PatchState, key: str) -> None:
        super().__init__()
        self.norm, self.state, self.key = norm, state, key
        self.previous_sums: torch.Tensor | None = None  # this band's, at the previous step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, norm = self.state, self.norm
        groups = norm.num_groups
        grouped = x.reshape(x.shape[0], groups, -1)
        if grouped.dtype not in (torch.float32, torch.float64):
            grouped = grouped.float()  # squares of half values overflow
        # float64 accumulation without a float64 copy of the activation
        sums = torch.stack([grouped.sum(-1, dtype=torch.float64),
                            (grouped * grouped).sum(-1, dtype=torch.float64)], dim=-1)  # (B,G,2)
        per_group = x.shape[1] // groups
        counts = [n * per_group for n in state.band.scaled(x[0, 0].numel())]
        mode = GroupNormMode.sync if state.synchronous else state.groupnorm
        if mode is GroupNormMode.sync:
            pieces = state.gather(self.key, sums) if state.comm.world_size > 1 else [sums]
            moments = torch.stack(pieces).sum(0) / sum(counts)
            mean, var = moments[..., 0], (moments[..., 1] - moments[..., 0] ** 2).clamp_min(0)
        elif mode is GroupNormMode.separate:
            moments = sums / grouped.shape[-1]
            mean, var = moments[..., 0], (moments[..., 1] - moments[..., 0] ** 2).clamp_min(0)
        else:
            own_stale = self.previous_sums if self.previous_sums is not None else sums
            stale = state.stale(self.key, own_stale)
            mean, var = estimate_moments(mode, stale, sums, own_stale, state.band.index, counts)
            state.publish(self.key, sums)
        if state.displaced and (state.synchronous or not state.frozen):
            self.previous_sums = sums  # this band's own stale sums, for the next step
        return self._normalize(x, mean, var)

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
