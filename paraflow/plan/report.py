"""The plan as data (`to_dict`, one JSON object) and as a markdown table, one row per rank.
Sizes are decimal: 1 MB = 1e6 bytes, 1 GB = 1e9 bytes (as plan_memory_gb and link GB/s)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RankPlan:
    rank: int
    role: str
    images: int
    weights: dict[str, int]  # module -> bytes this rank holds
    activations: dict[str, int]  # phase (denoise, decode) -> peak live bytes of that phase
    carried_bytes: int  # held from one step to the next (displaced: stale and in-flight pieces)
    comm_per_step: list[int]  # bytes sent at each denoising step (all batches of the rank)
    comm_decode: int  # patch decode: halos, GroupNorm sums, attention K/V, pixel bands
    comm_gather: int  # the images (and latents) gathered to rank 0
    device_peak: int  # resident weights + the largest phase, on the device
    fits: bool | None = None  # against the plan's budget (None: no budget)
    # FLOPs computed at each denoising step (all batches of the rank) and in the decode:
    # matrix products, convolutions, attention (paraflow/plan/flops.py)
    flops_per_step: list[int] = field(default_factory=list)
    flops_decode: int = 0
    denoiser_calls: int = 0  # full denoiser calls (a step cache's reused steps are not)
    comm_encode: int = 0  # the text encoders' weights gathered (sharded weights), all passes

    @property
    def comm_run(self) -> int:
        return sum(self.comm_per_step) + self.comm_encode + self.comm_decode + self.comm_gather

    @property
    def comm_per_image(self) -> int:
        """Denoising and decode traffic per image this rank makes (the result gather aside)."""
        return (sum(self.comm_per_step) + self.comm_decode) // max(self.images, 1)

    @property
    def flops_run(self) -> int:
        return sum(self.flops_per_step) + self.flops_decode

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "comm_run": self.comm_run, "comm_per_image": self.comm_per_image,
                "flops_run": self.flops_run}


@dataclass
class Plan:
    summary: dict[str, Any]
    ranks: list[RankPlan]
    budget_bytes: int | None = None
    budget_source: str = "none (set plan_memory_gb)"
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else all(r.fits for r in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "budget_bytes": self.budget_bytes,
                "budget_source": self.budget_source, "fits": self.fits,
                "ranks": [r.to_dict() for r in self.ranks], "notes": self.notes}

    def markdown(self) -> str:
        s = self.summary
        lines = [f"# plan: {s['model']} {s['width']}×{s['height']}, {s['strategy']}, "
                 f"{s['world_size']} rank(s), {s['steps']} steps", "",
                 " · ".join(f"{k}: {_text(v)}" for k, v in s.items()
                            if k not in ("model", "height", "width", "strategy")), "",
                 "| rank | role | images | weights " + "/".join(self.ranks[0].weights)
                 + " | act. denoise | act. decode | carried | device peak | sent/step | "
                   "sent/image | sent/run | FLOP/step | FLOP/run | calls | fits |",
                 "|" + "---|" * 15]
        for r in self.ranks:
            fits = "–" if r.fits is None else ("yes" if r.fits else "**no**")
            lines.append(
                f"| {r.rank} | {r.role} | {r.images} | "
                + " / ".join(human(b) for b in r.weights.values())
                + f" | {human(r.activations['denoise'])} | {human(r.activations['decode'])} | "
                f"{human(r.carried_bytes)} | {human(r.device_peak)} | "
                + _distinct(r.comm_per_step, human)
                + f" | {human(r.comm_per_image)} | {human(r.comm_run)} | "
                + _distinct(r.flops_per_step, flop) + f" | {flop(r.flops_run)} | "
                f"{r.denoiser_calls} | {fits} |")
        budget = "none" if self.budget_bytes is None else human(self.budget_bytes)
        verdict = {None: "no budget to check against", True: "fits on every rank",
                   False: "does NOT fit"}[self.fits]
        lines += ["", f"Device budget: {budget} ({self.budget_source}): {verdict}.", ""]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def human(nbytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def flop(count: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f}"


def _distinct(per_step: list[int], show: Any) -> str:
    """The different per-step figures, largest first (full steps, then reused or displaced)."""
    shown = dict.fromkeys(show(v) for v in sorted(set(per_step), reverse=True))
    return " · ".join(shown) or "0"


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
