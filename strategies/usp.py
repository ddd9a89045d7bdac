"""USP: Ulysses × Ring on the bands of one image (strategies/patch/usp.py). The bands form a grid
of ring_degree rows of ulysses_degree consecutive bands; heads re-shard within a row, keys/values
ring within a column. Composes with cfg_split and data_degree as the other band strategies do
(mesh data × cfg × patch, the patch dimension cut into ring × ulysses here). Exact."""

from __future__ import annotations

from functools import partial
from math import gcd
from typing import Any

from omegaconf import DictConfig

from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.families import denoiser_call
from paraflow.families.base import attention_heads, self_attention_modules
from paraflow.mesh import layout_label, mesh_of, world_of
from paraflow.strategies.patch.strategy import PatchParallel
from paraflow.strategies.patch.usp import USPAttnProcessor, USPGroups


def usp_degrees(bands: int, ulysses: int | None, ring: int | None,
                heads: int | None = None) -> tuple[int, int]:
    """(ulysses_degree, ring_degree) over `bands` ranks: the given ones checked, a missing one
    the quotient; both missing, the most Ulysses that `heads` (their gcd) divides evenly."""
    pairs = ", ".join(f"{u}×{bands // u}" for u in range(1, bands + 1) if bands % u == 0)
    for key, value in (("ulysses_degree", ulysses), ("ring_degree", ring)):
        if value is not None and (value < 1 or bands % value):
            raise ParaflowError(f"strategy.{key}={value}: must divide the {bands} ranks of one "
                                f"image; ulysses × ring pairs that fit: {pairs}")
    if ulysses is not None and ring is not None and ulysses * ring != bands:
        raise ParaflowError(f"strategy.ulysses_degree={ulysses} × strategy.ring_degree={ring} "
                            f"= {ulysses * ring}, but one image has {bands} ranks; ulysses × "
                            f"ring pairs that fit: {pairs}")
    if ulysses is None and ring is None:
        ulysses = max(u for u in range(1, bands + 1)
                      if bands % u == 0 and (heads is None or heads % u == 0))
    if ulysses is None:
        assert ring is not None
        ulysses = bands // ring
    return ulysses, bands // ulysses


def common_heads(model: Any) -> int | None:
    """The gcd of the heads of the model's self-attentions (None: none found)."""
    found = 0
    for _, module in self_attention_modules(model):
        heads = attention_heads(module)
        if heads is not None:
            found = gcd(found, heads)
    return found or None


class USP(PatchParallel):
    name = "usp"

    def __init__(self, cfg_split: bool = False, data_degree: int = 1,
                 shard_weights: bool = False, ulysses_degree: int | None = None,
                 ring_degree: int | None = None) -> None:
        super().__init__(cfg_split=cfg_split, data_degree=data_degree,
                         shard_weights=shard_weights)
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self._lines: list[list[int]] = []  # every image's ranks (world ranks), band order
        self._groups: USPGroups | None = None

    @property
    def mode(self) -> str:
        degrees = f"usp ulysses_degree={self.ulysses_degree}, ring_degree={self.ring_degree}"
        return layout_label(degrees, self.cfg_split, self.data_degree)

    def validate(self, cfg: DictConfig) -> None:
        super().validate(cfg)
        if self.mesh_layout(world_of(cfg)) is None:
            raise ParaflowError(f"strategy=usp with cfg_split=true on {world_of(cfg)} ranks: "
                                "the guidance halves would differ in size; use an even rank "
                                "count")
        usp_degrees(self.band_count(cfg), self.ulysses_degree, self.ring_degree)

    def setup(self, ctx: ParallelContext) -> None:
        super().setup(ctx)
        layout = self.mesh_layout(ctx.world_size)
        mesh = mesh_of(ctx, layout)
        if mesh is not None and layout is not None:
            self._lines = mesh.mesh.reshape(-1, layout["patch"]).tolist()

    def parallelize(self, pipe: Any, ctx: ParallelContext) -> None:
        """Degrees from the model's heads when unset, the row and column groups (collective:
        every rank parallelizes the same models in the same order), then the band layers."""
        if self._groups is None and self._lines:
            model = denoiser_call(pipe).model
            bands = len(self._lines[0])
            self.ulysses_degree, self.ring_degree = usp_degrees(
                bands, self.ulysses_degree, self.ring_degree, common_heads(model))
            width = self.ulysses_degree
            rows = [line[i:i + width] for line in self._lines for i in range(0, bands, width)]
            columns = [line[j::width] for line in self._lines for j in range(width)]
            self._groups = USPGroups(ctx.comm.split(rows), ctx.comm.split(columns))
            self.attention_processor = partial(USPAttnProcessor, groups=self._groups)
        super().parallelize(pipe, ctx)
