"""Band and halo index math for patch parallelism (pure functions, no tensors).

The latent is cut into N bands of whole rows. Bands are made of `unit`-row blocks (the UNet's
total downsampling factor), dealt out as evenly as possible, larger bands first, so every band
stays whole at every resolution level of the model. At a level where this rank's band has
`rows` rows, every band is scaled by the same factor: band_r = rows · n_r / n_me.
"""

from __future__ import annotations

from dataclasses import dataclass

from paraflow.errors import ParaflowError


def band_sizes(total_rows: int, n_bands: int, unit: int = 1) -> list[int]:
    """Rows per band: `total_rows` (a multiple of `unit`) in `unit` blocks, larger bands first."""
    if total_rows % unit:
        raise ParaflowError(f"{total_rows} latent rows are not a multiple of {unit}")
    blocks, extra = divmod(total_rows // unit, n_bands)
    if blocks == 0:
        raise ParaflowError(f"{total_rows} latent rows cannot give {n_bands} bands of at least "
                            f"{unit} row(s)")
    return [(blocks + (1 if i < extra else 0)) * unit for i in range(n_bands)]


def valid_heights(n_bands: int, unit: int, pixels_per_row: int, count: int = 4) -> list[int]:
    """The smallest image heights (pixels) that patch parallelism over `n_bands` accepts."""
    step = unit * pixels_per_row
    return [step * k for k in range(n_bands, n_bands + count)]


def check_layout(height: int, pixels_per_row: int, n_bands: int, unit: int) -> None:
    """Raise ParaflowError naming the valid sizes when `height` cannot be cut into `n_bands`."""
    rows = height // pixels_per_row
    if rows % unit == 0 and rows >= unit * n_bands:
        return
    sizes = ", ".join(str(h) for h in valid_heights(n_bands, unit, pixels_per_row))
    raise ParaflowError(
        f"height={height}: patch parallelism over {n_bands} bands needs the latent height "
        f"({rows} rows) to be a multiple of the model's downsampling ({unit}) with at least "
        f"{unit} rows per band; valid heights are multiples of {unit * pixels_per_row} from "
        f"{unit * pixels_per_row * n_bands} (e.g. {sizes})")


@dataclass(frozen=True)
class BandPlan:
    """The bands of one image at the base (latent) level and which one is this rank's."""

    sizes: tuple[int, ...]
    index: int

    @property
    def n(self) -> int:
        return len(self.sizes)

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.index])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.index]

    def scaled(self, mine: int) -> list[int]:
        """Every band's size at the level where this rank's band has `mine` rows (or tokens:
        height and width scale together, so token counts scale by the same ratio)."""
        own = self.sizes[self.index]  # integer arithmetic: compiled code traces it (not gcd)
        if any(n * mine % own for n in self.sizes):
            raise ParaflowError(f"band of {mine} rows/tokens does not match the band plan "
                                f"{self.sizes} (rank band {self.index})")
        return [n * mine // own for n in self.sizes]


def conv_halo(kernel: int, stride: int, padding: int, dilation: int = 1) -> tuple[int, int]:
    """Rows above and below a band that a convolution needs, for a band starting and ending on
    a multiple of `stride`: output rows [a/s, b/s) read input rows [a − top, b + bottom)."""
    top = padding
    bottom = dilation * (kernel - 1) + 1 - stride - padding
    return top, bottom


def conv_keeps_bands(rows: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> bool:
    """True when the full-image output height is rows / stride, so bands map to bands."""
    if rows % stride:
        return False
    full = (rows + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return full == rows // stride


def halo_sources(sizes: list[int], index: int, top: int, bottom: int) -> tuple[int, int]:
    """How many halo rows band `index` takes from the band above and below (0 at the image
    edges, where the convolution's zero padding applies). Raises if a neighbour is thinner."""
    above = top if index > 0 else 0
    below = bottom if index < len(sizes) - 1 and bottom > 0 else 0
    if (index > 0 and sizes[index - 1] < top) or (index < len(sizes) - 1
                                                  and sizes[index + 1] < max(bottom, 0)):
        raise ParaflowError(f"a band of {min(sizes)} rows is thinner than a convolution's halo "
                            f"({max(top, bottom)} rows); use a taller image or fewer ranks")
    return above, below
