"""The service's LoRA adapters: `serve.lora=[{name: ink, path: DIR}]` are loaded once per
instance as the model's switched adapters (model.adapters, paraflow/models/lora.py), and each
request turns on the ones it names (`"lora": [{"name": "ink", "scale": 0.8}]`) for its batch."""

from __future__ import annotations

from omegaconf import DictConfig, open_dict


def with_served_adapters(cfg: DictConfig) -> DictConfig:
    """`cfg` with serve.lora appended to model.adapters (a copy; `cfg` itself is kept)."""
    served = list(cfg.serve.get("lora") or [])
    if not served:
        return cfg
    own = cfg.model.get("adapters")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model.adapters = [*(own or []), *cfg.serve.lora]  # typed nodes (AdapterConfig)
    return cfg


def check_served_adapters(cfg: DictConfig) -> None:
    """Before any instance starts: the adapters' files and layers (as a run checks model.lora)."""
    from paraflow.models.lora import check_loras

    if cfg.serve.get("lora"):
        check_loras(with_served_adapters(cfg).model)
