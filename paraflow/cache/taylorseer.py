"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers"), on a transformer's residual stream: full steps on a schedule of step numbers
(`TaylorSeerOptions.full`); on the others the first block runs and the residual of the rest
(blocks 2..N over the first block's output, the one First-Block Cache reuses, hooks.py) is
forecast by a Taylor expansion, its derivatives taken as finite differences over the last full
steps, and added to the fresh first block's output. Order 0 is plain reuse.

Written here rather than with `diffusers.hooks.apply_taylorseer_cache`, which does not fit:

- It forecasts the output of each module it hooks (by default the attention modules) and runs
  every other module: it cannot skip a span of blocks and add their forecast residual to a fresh
  first block. Its closest setting (lite mode) feeds zeros through every block and forecasts
  `proj_out`, a module name PixArt, SD3 and Flux share but outside families need not.
- Its schedule counts the hooked module's own calls and restarts only on
  `reset_stateful_hooks`; it never passes through. paraflow's loop gives each step's number
  (`Step.index`), passes through outside a generation (a kept Session, the service) and counts
  the forecast steps for run.json (`reused_steps`), which diffusers' hook does not report.
  (Counting calls would keep a band strategy's ranks in step too: that is not what rules it out.)

Its expansion is the same as this one (`TaylorSeries`: the same divided-difference recursion and
the same sum, which tests/test_cache.py checks against diffusers' `TaylorSeerState`); that class
is internal to diffusers and moves its own step counter, so paraflow keeps these few lines. As in
the paper and in diffusers, the k-th backward difference over the interval stands for the k-th
derivative at the last full step: order 1 continues a line exactly, order 2 a parabola only
roughly.

Under every strategy the step number decides, so the ranks of an image skip the same blocks on
the same steps with no collective; each rank forecasts its own band (or shard) of the residual,
and the expansion works element by element, so a band's forecast is that band of one device's.
"""

from __future__ import annotations

import math

import torch

Tensors = tuple[torch.Tensor, ...]


class TaylorSeries:
    """A few tensors' Taylor expansion in the step number, up to `order`, from the values given
    at full steps: factor k is the k-th divided difference over the last k + 1 of them (as
    many as there have been), kept in float32."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.factors: list[Tensors] = []  # factor k: derivative k, one tensor per input
        self.step: int | None = None  # the last full step's number
        self.dtypes: tuple[torch.dtype, ...] = ()

    def update(self, step: int, values: Tensors) -> None:
        """The values at full step `step` (after every earlier one)."""
        new: list[Tensors] = [tuple(v.float() for v in values)]
        if self.step is not None and self.factors \
                and [v.shape for v in values] == [f.shape for f in self.factors[0]]:
            apart = step - self.step
            for k in range(min(self.order, len(self.factors))):
                new.append(tuple((a - b) / apart for a, b in zip(new[k], self.factors[k])))
        self.factors, self.step = new, step
        self.dtypes = tuple(v.dtype for v in values)

    def predict(self, step: int) -> Tensors:
        """The expansion's values at step `step`, in the values' own dtypes."""
        if self.step is None:
            raise ValueError("TaylorSeries.predict before any update")
        ahead = step - self.step
        out = []
        for i, dtype in enumerate(self.dtypes):
            total = self.factors[0][i].clone()
            for k in range(1, len(self.factors)):
                total.add_(self.factors[k][i], alpha=ahead ** k / math.factorial(k))
            out.append(total.to(dtype))
        return tuple(out)
