"""A LoRA with random weights for a model config, saved as diffusers saves a trained one
(pytorch_lora_weights.safetensors): for trying `model.lora` offline and for the tests.

    python -m paraflow.tools.random_lora --out my_lora model=tiny_random [--rank 4]
        [--targets to_q,to_k,to_v,to_out.0] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from paraflow.families import denoiser

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _add_random_adapter(module: torch.nn.Module, rank: int, targets: Sequence[str],
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """peft LoRA layers on `targets`, both factors random (a trained LoRA's B is not zero).
    Through peft itself: transformers' own add_adapter wants a newer peft than diffusers."""
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)),
                            module)
    for name, param in module.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    layers: dict[str, torch.Tensor] = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(module))
    return layers


def save_random_lora(pipe: Any, out: Path, rank: int = 4, targets: Sequence[str] = ATTENTION,
                     seed: int = 0) -> Path:
    """Add random LoRA layers to `pipe`'s denoiser and save them to `out`; `pipe` keeps the
    layers (build a fresh one to run)."""
    generator = torch.Generator().manual_seed(seed)
    kind = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    layers = {f"{kind}_lora_layers": _add_random_adapter(denoiser(pipe), rank, targets, generator)}
    type(pipe).save_lora_weights(str(out), **layers, safe_serialization=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from paraflow.api import compose
    from paraflow.models import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default=",".join(ATTENTION))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="model config overrides, e.g. model=tiny")
    args = parser.parse_args(argv)
    pipe = load_pipeline(compose(args.overrides).model)
    save_random_lora(pipe, args.out, args.rank, args.targets.split(","), args.seed)
    print(f"LoRA written to {args.out}; use it as model.lora=[{{path:{args.out},scale:0.8}}]")


if __name__ == "__main__":
    main()
