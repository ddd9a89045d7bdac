"""attention.backend (paraflow/attention.py): a torch SDPA kernel reaches every attention of a
run (the profiler shows the kernel that ran), a diffusers dispatch backend runs paraflow's band
processors, and a backend that is unknown, a hub download, not installed or not for this
accelerator is refused before launch, naming the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from paraflow.api import compose, generate
from paraflow.attention import attend, attention_backend, check_backend
from paraflow.errors import ParaflowError
from paraflow.validate import validate
from tests.conftest import read_latents

BASE = ["model=tiny_random", "steps=2", "save_latents=true", "pipeline.progress=false",
        "launcher.threads_per_rank=1"]
MATH = "aten::_scaled_dot_product_attention_math"


def profiled_run(tmp_path: Path, name: str, overrides: list[str]) -> tuple[torch.Tensor, set[str]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(compose([*BASE, *overrides]), tmp_path / name)
    return read_latents(tmp_path / name), {event.key for event in prof.key_averages()}


def test_a_torch_kernel_reaches_every_attention(tmp_path: Path) -> None:
    plain, plain_ops = profiled_run(tmp_path, "plain", [])
    math, math_ops = profiled_run(tmp_path, "math", ["attention.backend=sdpa_math"])
    assert MATH in math_ops and MATH not in plain_ops  # torch picked its fused CPU kernel
    assert torch.allclose(math, plain, atol=1e-5)


def test_a_dispatch_backend_runs_paraflows_attention() -> None:
    """paraflow's band and Ulysses processors attend through `attend`: under a diffusers
    dispatch backend (`_native_math` here, as `flash` or `sage` on a GPU) it runs that backend,
    equal to torch's default kernel within 1e-5 (2 ranks: test_compile_parallel.py)."""
    q, k, v = (torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof, attention_backend("_native_math"):
        dispatched = attend(q, k, v, scale=0.3)
    assert MATH in {event.key for event in prof.key_averages()}
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.allclose(dispatched, expected, atol=1e-5)


@pytest.mark.parametrize("backend,needle", [
    ("fastest", "attention.backend=fastest: one of sdpa, sdpa_math"),
    ("flash_hub", "hub backends download kernels at run time"),
    ("sdpa_flash", "attention.backend=sdpa_flash needs a CUDA device and this run's "
                   "accelerator is cpu"),
    ("flash", "attention.backend=flash needs a CUDA device"),
])
def test_bad_backends_are_refused_before_launch(backend: str, needle: str) -> None:
    with pytest.raises(ParaflowError) as error:
        validate(compose(["model=tiny_random", "launcher.accelerator=cpu",
                          f"attention.backend={backend}"]), None)
    assert needle in str(error.value)


def test_a_backend_whose_package_is_missing_is_refused() -> None:
    """On a CUDA run (checked here without one), sage needs the sageattention package."""
    pytest.importorskip("diffusers")
    try:
        import sageattention  # noqa: F401
        pytest.skip("sageattention is installed here")
    except ImportError:
        pass
    with pytest.raises(ParaflowError) as error:
        check_backend("sage", "cuda")
    assert "attention.backend=sage: not installed" in str(error.value)
    assert "sageattention" in str(error.value)
