"""Tensor parallelism: plan resolution and the hand-split layers without processes, then two gloo
ranks against one device on the SD-like and SDXL-like tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.activations import GEGLU
from omegaconf import DictConfig
from torch import nn

from paraflow.api import compose
from paraflow.context import ParallelContext
from paraflow.errors import ParaflowError
from paraflow.families import family_of_class_name
from paraflow.launcher import launch
from paraflow.models import load_pipeline
from paraflow.models.skeleton import denoiser_skeleton
from paraflow.registry import build_strategy
from paraflow.strategies.tensor import allowed_degrees, check_divisible, resolve_plan
from paraflow.strategies.tensor_layers import (
    InputShardedConv2d,
    interleave_gated,
    shard_conv_out,
    shard_group_norm,
)

from .conftest import read_latents, run_paraflow

TENSOR_2 = ["+strategy=tensor", "launcher.devices=2"]
COMMON = ["save_latents=true", "launcher.threads_per_rank=1"]


def default_plan() -> dict[str, str]:
    return family_of_class_name("UNet2DConditionModel").tensor_plan


# --- without processes ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny_random", "tiny_xl_random"])
def test_plan_resolves_on_both_architectures(model: str) -> None:
    skeleton = denoiser_skeleton(compose([f"model={model}"]).model)
    splits = resolve_plan(skeleton, default_plan())
    styles = {s.style for s in splits}
    assert styles == {"colwise", "colwise_gated", "rowwise", "heads", "conv_out", "conv_in",
                      "groupnorm"}
    n_resnets = sum(1 for name, _ in skeleton.named_modules() if name.endswith("conv2"))
    assert sum(s.style == "conv_in" for s in splits) == n_resnets
    assert allowed_degrees(splits) == [1, 2, 4]  # 4 heads, 8 groups everywhere
    check_divisible(splits, 2)
    with pytest.raises(ParaflowError, match=r"attn1 has 4 attention heads.*allows: 1, 2, 4"):
        check_divisible(splits, 3)


def test_plan_errors_name_the_pattern_or_layer() -> None:
    skeleton = denoiser_skeleton(compose(["model=tiny_random"]).model)
    with pytest.raises(ParaflowError, match=r"\*\.nothing match no module"):
        resolve_plan(skeleton, {"*.attn1": "heads", "*.nothing": "colwise"})
    with pytest.raises(ParaflowError, match="unknown style; use one of colwise"):
        resolve_plan(skeleton, {"*.attn1": "sideways"})
    with pytest.raises(ParaflowError, match="conv_in is a Conv2d; style 'colwise' applies to Lin"):
        resolve_plan(skeleton, {"conv_in": "colwise"})


def test_gated_projection_split_keeps_value_and_gate_paired() -> None:
    torch.manual_seed(0)
    full = GEGLU(8, 12)
    x = torch.randn(3, 5, 8)
    expected = full(x)  # [3, 5, 12]
    for n in (2, 3):
        shard = GEGLU(8, 12)
        shard.load_state_dict(full.state_dict())
        interleave_gated(shard.proj, n)
        rows = 2 * 12 // n
        for rank in range(n):
            local = GEGLU(8, 12 // n)
            local.proj.weight.data = shard.proj.weight[rank * rows:(rank + 1) * rows]
            local.proj.bias.data = shard.proj.bias[rank * rows:(rank + 1) * rows]
            part = slice(rank * 12 // n, (rank + 1) * 12 // n)
            torch.testing.assert_close(local(x), expected[..., part])


def test_conv_groupnorm_conv_split_sums_to_the_whole() -> None:
    """conv1 by output channels → GroupNorm by whole groups → conv2 by input channels: the sum
    of the ranks' partial outputs (what the all-reduce computes) is the unsplit block."""
    torch.manual_seed(0)
    conv1, norm, conv2 = nn.Conv2d(6, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Conv2d(8, 6, 3,
                                                                                        padding=1)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 5, 7)
    expected = conv2(torch.relu(norm(conv1(x))))
    bias = conv2.bias.detach().view(1, -1, 1, 1) if conv2.bias is not None else 0
    partials = []
    for rank in range(2):
        c1, g, c2 = (nn.Conv2d(6, 8, 3, padding=1), nn.GroupNorm(4, 8),
                     nn.Conv2d(8, 6, 3, padding=1))
        c1.load_state_dict(conv1.state_dict())
        g.load_state_dict(norm.state_dict())
        c2.load_state_dict(conv2.state_dict())
        shard_conv_out(c1, 2, rank)
        shard_group_norm(g, 2, rank)
        split = InputShardedConv2d.from_conv(c2, 2, rank, lambda t: t)  # reduce: none yet
        assert (c1.out_channels, g.num_groups, split.in_channels) == (4, 2, 4)
        partials.append(split(torch.relu(g(c1(x)))) - bias)  # each rank added the bias once
    torch.testing.assert_close(sum(partials) + bias, expected)


# --- two gloo ranks against one device ------------------------------------------------------

def _run_pair(root: Path, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    single = run_paraflow(root / "single", [f"model={model}", *COMMON])
    tensor = run_paraflow(root / "tensor", [f"model={model}", *COMMON, *TENSOR_2])
    return single, tensor


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("tensor_tiny")
    return (root, *_run_pair(root, "tiny_random"))


@pytest.mark.slow
def test_tiny_latents_equal_single_device(tiny_pair: tuple[Path, dict, dict]) -> None:
    root, _, tensor = tiny_pair
    assert tensor["strategy"] == "tensor" and tensor["world_size"] == 2
    ours, reference = read_latents(root / "tensor"), read_latents(root / "single")
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert json.loads((root / "tensor" / "run.json").read_text())["images"] == ["images/0000.png"]


@pytest.mark.slow
def test_each_rank_holds_about_half_the_denoiser(tiny_pair: tuple[Path, dict, dict]) -> None:
    _, single, tensor = tiny_pair
    whole = single["param_bytes"]["unet"][0]
    per_rank = tensor["param_bytes"]["unet"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    # Split layers halve; the rest (conv_in/out, up/down-samplers, proj_in/out, time embedding,
    # shortcuts, norms before a split) stays whole: 0.58 of the tiny UNet per rank.
    assert 0.5 * whole < per_rank[0] <= 0.6 * whole
    assert tensor["param_bytes"]["vae"] == single["param_bytes"]["vae"] * 2  # not split


@pytest.mark.slow
def test_comm_bytes_match_the_all_reduce_formula(tiny_pair: tuple[Path, dict, dict]) -> None:
    """Per rank and denoising step: 2·(N−1)/N · Σ bytes of the outputs of every row-wise linear
    and input-split conv (one all-reduce per attention, feed-forward and ResNet block).

    Tiny SD at 64² (8×8 latents), guidance on (batch 2), fp32: per image, down 8192 + 4096 + 256,
    mid 1280, up 512 + 8192 + 16384 = 38912 elements → 2·(1/2)·4·2·38912 = 311296 bytes/step."""
    _, _, tensor = tiny_pair
    pipe = load_pipeline(compose(["model=tiny_random"]).model)
    unet = pipe.unet
    modules = dict(unet.named_modules())
    elements = [0]
    for split in resolve_plan(unet, default_plan()):
        if split.style in ("rowwise", "conv_in"):
            modules[split.name].register_forward_hook(
                lambda m, a, out: elements.__setitem__(0, elements[0] + out.numel()))
    with torch.inference_mode():
        unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 16, 32))
    n = 2
    per_step = int(2 * (n - 1) / n * 4 * elements[0])
    assert per_step == 311296
    for rank in range(n):
        assert tensor["comm_bytes_per_step"][rank] == {str(s): per_step for s in range(3)}
        assert tensor["comm_bytes"][rank] == 3 * per_step  # nothing gathered: all ranks agree


def test_tiny_xl_latents_equal_single_device(tmp_path: Path) -> None:
    single, tensor = _run_pair(tmp_path, "tiny_xl_random")
    ours, reference = read_latents(tmp_path / "tensor"), read_latents(tmp_path / "single")
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert tensor["param_bytes"]["unet"][0] <= 0.6 * single["param_bytes"]["unet"][0]


def count_collectives(ctx: ParallelContext, cfg: DictConfig) -> dict[str, int]:
    """A rank worker: shard the tiny UNet, run one forward, and tally every collective issued
    through torch.distributed (c10d and the functional ones DTensor uses) against the
    communicator's own count."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    seen: list[str] = []

    def spy(module: Any, name: str) -> None:
        original = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return original(*args, **kwargs)

        setattr(module, name, counted)

    for name in ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single",
                 "broadcast"):
        spy(funcol, name)
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "scatter",
                 "reduce_scatter_tensor", "all_to_all_single", "send", "recv"):
        spy(dist, name)
    pipe = load_pipeline(cfg.model)
    strategy = build_strategy(cfg.strategy)
    strategy.setup(ctx)
    strategy.parallelize(pipe, ctx)
    setup_calls = len(seen)
    with torch.inference_mode():
        pipe.unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 16, 32))
    return {"setup": setup_calls, "forward": len(seen) - setup_calls, "counted": ctx.comm.calls}


@pytest.mark.slow
def test_every_collective_goes_through_the_communicator() -> None:
    cfg = compose(["model=tiny_random", *TENSOR_2, "launcher.threads_per_rank=1"])
    tally = launch(cfg, count_collectives)
    # 7 transformer blocks × (attn1, attn2, ff) + 11 ResNet blocks: one all-reduce each.
    assert tally == {"setup": 0, "forward": 32, "counted": 32}


# --- refused before any rank starts ---------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["launcher.devices=3"], r"over 3 ranks: layer down_blocks\.0\.attentions\.0\.transformer_"
                             r"blocks\.0\.attn1 has 4 attention heads.*allows: 1, 2, 4"),
    (["launcher.devices=2", "model.unet.attention_head_dim=1"],
     r"attn1 has 1 attention heads, which do not split into 2 .*allows: 1$"),
])
def test_indivisible_heads_refused_before_launch(overrides: list[str], message: str,
                                                 tmp_path: Path) -> None:
    with pytest.raises(ParaflowError, match=message):
        run_paraflow(tmp_path / "run", ["model=tiny_random", "+strategy=tensor", *overrides])
    assert not (tmp_path / "run").exists()
