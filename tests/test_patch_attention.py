"""The patch self-attention processor against diffusers' own processors, in one process.

One band (a one-rank PatchState: nothing is exchanged) must give what the module's stock
processor gives, for Attention modules with non-default settings: a scale other than
1/sqrt(head_dim) (scale_qk=False, or `attn.scale` set), residual_connection,
rescale_output_factor, group_norm, spatial_norm, 4-D input (the VAE mid-block), masks, and a
context with norm_cross (cross-attention exchanges nothing). Two bands, each in its own thread
with an in-process all-gather, must give the one-band result. Tolerance: max |Δ| <= 1e-5 (fp32).

The reference is AttnProcessor2_0; where a module has a non-default scale it is AttnProcessor,
the processor diffusers itself gives such modules (AttnProcessor2_0 leaves `attn.scale` to SDPA's
default, see its TODO).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from paraflow.comm import Communicator
from paraflow.context import ParallelContext
from paraflow.strategies.patch.attention import PatchSelfAttnProcessor
from paraflow.strategies.patch.bands import BandPlan
from paraflow.strategies.patch.layers import swap_patch_layers
from paraflow.strategies.patch.state import PatchState

TOL = 1e-5
B, C, H, W = 2, 32, 6, 4  # 4-D input: (B, C, H, W); 3-D: (B, H·W, C)


def _attention(**options: Any) -> Attention:
    torch.manual_seed(0)
    settings = {"query_dim": C, "heads": 4, "dim_head": 8, **options}
    attn = Attention(**settings).eval()
    for param in attn.parameters():  # away from the initialisation (zeros, ones)
        param.data.add_(0.1 * torch.randn_like(param))
    return attn


def _inputs(four_d: bool, seed: int = 1) -> torch.Tensor:
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))
    return x if four_d else x.flatten(2).transpose(1, 2)


def _one_band(attn: Attention, rows: int) -> Attention:
    """`attn` with the patch processor over a one-rank state whose one band is the image."""
    patched = copy.deepcopy(attn)
    state = PatchState(ParallelContext.single().comm, plan=BandPlan((rows,), 0))
    patched.set_processor(PatchSelfAttnProcessor(state, "attn"))
    return patched


def _stock(attn: Attention, processor: Any) -> Attention:
    stock = copy.deepcopy(attn)
    stock.set_processor(processor)
    return stock


Case = tuple[dict[str, Any], bool, Callable[[], Any]]
CASES: dict[str, Case] = {
    "default": ({}, False, AttnProcessor2_0),
    "scale_qk_false": ({"scale_qk": False}, False, AttnProcessor),
    "residual_rescale": ({"residual_connection": True, "rescale_output_factor": 2.0}, False,
                         AttnProcessor2_0),
    "group_norm_4d": ({"norm_num_groups": 8}, True, AttnProcessor2_0),
    "vae_mid_block": ({"heads": 1, "dim_head": C, "norm_num_groups": 8, "eps": 1e-6,
                       "residual_connection": True, "rescale_output_factor": 1.5, "bias": True,
                       "upcast_softmax": True, "_from_deprecated_attn_block": True}, True,
                      AttnProcessor2_0),
    "qk_norm": ({"qk_norm": "layer_norm"}, False, AttnProcessor2_0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_band_equals_stock(name: str) -> None:
    options, four_d, reference = CASES[name]
    attn = _attention(**options)
    x = _inputs(four_d)
    with torch.inference_mode():
        want = _stock(attn, reference())(x)
        got = _one_band(attn, H)(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= TOL


def test_custom_scale_is_honoured() -> None:
    attn = _attention(residual_connection=True)
    attn.scale = 0.9  # not 1/sqrt(8): SDPA's default would differ
    x = _inputs(False)
    with torch.inference_mode():
        want = _stock(attn, AttnProcessor())(x)
        got = _one_band(attn, H)(x)
        default = _stock(attn, AttnProcessor2_0())(x)
    assert float((got - want).abs().max()) <= TOL
    assert float((default - want).abs().max()) > 1e-3  # the case tells the scales apart


def test_spatial_norm() -> None:
    attn = _attention(spatial_norm_dim=4, norm_num_groups=None)
    x = _inputs(True)
    zq = torch.randn(B, 4, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = _stock(attn, AttnProcessor2_0())(x, temb=zq)
        got = _one_band(attn, H)(x, temb=zq)
    assert float((got - want).abs().max()) <= TOL


@pytest.mark.parametrize("shape", [(B, 1, H * W), (B, H * W, H * W)])
def test_attention_mask(shape: tuple[int, ...]) -> None:
    attn = _attention()
    x = _inputs(False)
    mask = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 4
    with torch.inference_mode():
        want = _stock(attn, AttnProcessor2_0())(x, attention_mask=mask)
        got = _one_band(attn, H)(x, attention_mask=mask)
        unmasked = _stock(attn, AttnProcessor2_0())(x)
    assert float((got - want).abs().max()) <= TOL
    assert float((unmasked - want).abs().max()) > 1e-3


def test_context_with_norm_cross_exchanges_nothing() -> None:
    """A context goes to the keys/values as in stock (norm_cross first); no gather happens."""
    attn = _attention(cross_attention_dim=16, cross_attention_norm="layer_norm")
    attn.is_cross_attention = False  # as a self-attention module called with a context
    x = _inputs(False)
    context = torch.randn(B, 5, 16, generator=torch.Generator().manual_seed(4))
    patched = _one_band(attn, H)
    state = patched.processor.state
    state.comm = _NoGather(state.comm)
    with torch.inference_mode():
        want = _stock(attn, AttnProcessor2_0())(x, encoder_hidden_states=context)
        got = patched(x, encoder_hidden_states=context)
    assert float((got - want).abs().max()) <= TOL


class _NoGather(Communicator):
    def __init__(self, comm: Communicator) -> None:
        super().__init__(None, comm.world_size, comm.rank)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise AssertionError("a call with a context must not exchange keys/values")


# --- two bands, one thread each ---------------------------------------------------------------

class _Board:
    """An all-gather between threads: every thread posts its piece, then all read all."""

    def __init__(self, n: int) -> None:
        self.pieces: list[torch.Tensor | None] = [None] * n
        self.barrier = threading.Barrier(n, timeout=30)

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.pieces[rank] = tensor.clone()
        self.barrier.wait()
        out = [p for p in self.pieces if p is not None]
        self.barrier.wait()
        return out


class _ThreadComm(Communicator):
    def __init__(self, board: _Board, rank: int) -> None:
        super().__init__(None, len(board.pieces), rank)
        self.board = board

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self.board.exchange(self.rank, tensor)


def _two_bands(attn: Attention, x: torch.Tensor, sizes: tuple[int, int],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run `attn` (patch layers swapped in, GroupNorm included) on each band of rows of the
    4-D `x` in its own thread; the bands' outputs stacked back into the image."""
    board = _Board(2)
    outputs: list[torch.Tensor | None] = [None, None]
    errors: list[BaseException] = []

    def band(rank: int) -> None:
        try:
            state = PatchState(_ThreadComm(board, rank), plan=BandPlan(sizes, rank))
            mine = copy.deepcopy(attn)
            swap_patch_layers(mine, state)
            start = sum(sizes[:rank])
            with torch.inference_mode():
                outputs[rank] = mine(x[:, :, start:start + sizes[rank]], attention_mask=mask)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            board.barrier.abort()

    threads = [threading.Thread(target=band, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return torch.cat([o for o in outputs if o is not None], dim=2)


@pytest.mark.parametrize("name", ["vae_mid_block", "scale_qk_false", "residual_rescale"])
def test_two_uneven_bands_equal_stock(name: str) -> None:
    options, _, reference = CASES[name]
    attn = _attention(**options)
    x = _inputs(True)
    with torch.inference_mode():
        want = _stock(attn, reference())(x)
    got = _two_bands(attn, x, (4, 2))
    assert float((got - want).abs().max()) <= TOL


def test_two_bands_mask_per_query() -> None:
    """A mask with one row per query of the image: each band uses its own rows."""
    attn = _attention()
    x = _inputs(True)
    mask = torch.randn(B, H * W, H * W, generator=torch.Generator().manual_seed(5)) * 4
    with torch.inference_mode():
        want = _stock(attn, AttnProcessor2_0())(x, attention_mask=mask)
    got = _two_bands(attn, x, (2, 4), mask)
    assert float((got - want).abs().max()) <= TOL
