"""Compilation, a policy of a stage: `pipeline.stages.NAME.compile=regional|full|none` with
`pipeline.stages.NAME.compile_options.{backend,mode,dynamic,fullgraph}` (torch.compile's).
Denoise and the VAE stages compile (a class with `compiles = True`); the text encoders run once
per prompt and do not.

- `regional`: each repeated block gets its own compiled forward — the denoiser family's
  `compile_regions` (a transformer's blocks, alike, so one graph serves them all; a UNet's
  resolution levels), a VAE's encoder and decoder blocks. Written here rather than with
  diffusers' `compile_repeated_blocks`: that compiles each block's whole call
  (`nn.Module.compile`), hooks included, so a step cache's hooks (paraflow/cache), which decide
  on the host and may skip the block, would break every block's graph; here the hooks wrap the
  compiled forward and stay eager. It also covers only classes that list `_repeated_blocks`
  (not PixArt's, SD3's or a UNet's levels).
- `full`: the whole module's call (`nn.Module.compile`, its forward hooks too: a strategy's band
  split of the denoiser call); a VAE's encoder and decoder (vae.decode does not go through the
  VAE's own call).

A module compiles once, when its stage first runs (graph.py), after the strategy laid its
layers over it, so the compiled graphs hold the strategy's exchanges; torch's on-disk caches
(inductor's FX graph cache) make a later process's compile of the same graph cheap. Graph breaks
and the graphs compiled are read from dynamo's counters (`compile_report`, run.json's
`compile`).
"""

from __future__ import annotations

import shutil
from typing import Any

import torch
from torch import nn

from paraflow.errors import ParaflowError

MODES = ("none", "regional", "full")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor modes that use CUDA graphs
_MARK = "_paraflow_compiled"  # on a compiled module: its mode


def compile_mode(spec: Any) -> str:
    """The stage's compile mode, as a string (the schema holds an enum)."""
    mode = spec.get("compile") or "none"
    return str(getattr(mode, "value", mode))


def compile_kwargs(spec: Any) -> dict[str, Any]:
    """torch.compile's keyword arguments from the stage's compile_options."""
    options = dict(spec.get("compile_options") or {})
    kwargs: dict[str, Any] = {"backend": options.get("backend") or "inductor",
                              "fullgraph": bool(options.get("fullgraph"))}
    if options.get("mode") is not None:
        kwargs["mode"] = options["mode"]
    if options.get("dynamic") is not None:
        kwargs["dynamic"] = bool(options["dynamic"])
    return kwargs


def check_compile(stage: str, spec: Any, stage_class: type, accelerator: str | None) -> None:
    """Pre-launch: the stage can compile, with a backend and mode this machine has.
    `accelerator`: the run's resolved one (None: planning for another machine)."""
    mode = compile_mode(spec)
    key = f"pipeline.stages.{stage}"
    if mode not in MODES:
        raise ParaflowError(f"{key}.compile={mode}: one of {', '.join(MODES)}")
    if mode == "none":
        return
    if not getattr(stage_class, "compiles", False):
        raise ParaflowError(f"{key}.compile={mode}: {stage_class.__name__} cannot compile; the "
                            "denoise and VAE stages can (compile=none here)")
    kwargs = compile_kwargs(spec)
    backend = kwargs["backend"]
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ParaflowError(f"{key}.compile_options.backend={backend}: one of "
                            f"{', '.join(sorted(backends))}")
    wanted = kwargs.get("mode")
    if wanted is not None:
        if backend != "inductor":
            raise ParaflowError(f"{key}.compile_options.mode={wanted}: a mode is inductor's; "
                                f"backend={backend} takes none")
        modes = sorted(torch._inductor.list_mode_options())
        if wanted not in modes:
            raise ParaflowError(f"{key}.compile_options.mode={wanted}: one of "
                                f"{', '.join(modes)}")
        if wanted in CUDA_GRAPH_MODES and accelerator == "cpu":
            raise ParaflowError(f"{key}.compile_options.mode={wanted}: CUDA graphs need a CUDA "
                                "device and this run's accelerator is cpu; use "
                                "max-autotune-no-cudagraphs or default")
    if backend == "inductor" and accelerator == "cpu" and not _cpp_compiler():
        raise ParaflowError(f"{key}.compile={mode}: inductor on CPU needs a C++ compiler "
                            "(g++ or clang++) on PATH; install one or use compile=none")


def _cpp_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def vae_regions(vae: nn.Module, mode: str) -> list[nn.Module]:
    """What a VAE compiles: its encoder's and decoder's blocks (regional) or the two whole."""
    parts = [p for p in (getattr(vae, "encoder", None), getattr(vae, "decoder", None))
             if p is not None]
    if mode == "full":
        return parts
    blocks: list[nn.Module] = []
    for part in parts:
        for name in ("down_blocks", "mid_block", "up_blocks"):
            found = getattr(part, name, None)
            if isinstance(found, nn.ModuleList):
                blocks.extend(found)
            elif found is not None:
                blocks.append(found)
    return blocks


def compile_stage_modules(spec: Any, modules: dict[str, nn.Module]) -> None:
    """Compile the stage's modules (component name → module) as its policy says, once each;
    a module another stage compiled the same way is left as it is."""
    mode = compile_mode(spec)
    if mode == "none":
        return
    kwargs = compile_kwargs(spec)
    for name, module in modules.items():
        done = module.__dict__.get(_MARK)
        if done == mode:
            continue
        if done is not None:
            raise ParaflowError(f"{name} is compiled {done} by an earlier stage; a stage cannot "
                                f"compile it {mode} too")
        if name == "vae":
            targets = vae_regions(module, mode)
        elif mode == "full":
            targets = [module]
        else:
            from paraflow.families import family_of  # the denoisers' families
            targets = family_of(module).compile_regions(module)
        # Blocks alike share one compiled code object, and a block whose layers keep their own
        # state (displaced patch keys each layer's stale activations by name) guards on it: up
        # to three variants per block (synchronous, first displaced, later displaced) must fit
        # under dynamo's recompile limit, or the rest would run eagerly.
        limit = torch._dynamo.config
        limit.recompile_limit = max(int(limit.recompile_limit), 3 * len(targets) + 2)
        for target in targets:
            if mode == "full":
                target.compile(**kwargs)
            else:  # the forward only: hooks on the block's call stay outside the graph
                target.forward = torch.compile(target.forward, **kwargs)
        object.__setattr__(module, _MARK, mode)


def compile_counts() -> dict[str, Any]:
    """This process's compilation so far, from dynamo's counters: graphs compiled, graph
    breaks by reason, operators captured."""
    from torch._dynamo.utils import counters

    stats = counters["stats"]
    return {"graphs": int(stats.get("unique_graphs", 0)),
            "graph_breaks": {str(reason): int(n) for reason, n in
                             counters["graph_break"].items()},
            "ops_captured": int(stats.get("calls_captured", 0))}


def compile_report(before: dict[str, Any]) -> dict[str, Any]:
    """What compiled since `before` (compile_counts()): run.json's `compile`, per rank."""
    now = compile_counts()
    breaks = {reason: n - before["graph_breaks"].get(reason, 0)
              for reason, n in now["graph_breaks"].items()}
    return {"graphs": now["graphs"] - before["graphs"],
            "graph_breaks": {reason: n for reason, n in breaks.items() if n},
            "ops_captured": now["ops_captured"] - before["ops_captured"]}


def any_stage_compiles(stages: Any) -> bool:
    return any(compile_mode(spec) != "none" for spec in stages.values())


_compiled_for: str | None = None  # the last compiling session's configuration, in this process


def fresh_compilation(cfg: Any) -> None:
    """Before a session that compiles: forget what an earlier session of another configuration
    compiled in this process (kept ranks run many). Dynamo caches by code object, with guards on
    what it saw, so another model's or strategy's graphs would pile up recompilations (and past
    torch's recompile limit run eagerly); a session of the same configuration reuses them,
    as a service's or a benchmark's repeated runs do. Inductor's on-disk caches stay."""
    global _compiled_for
    from omegaconf import OmegaConf

    signature = OmegaConf.to_yaml({key: cfg.get(key) for key in
                                   ("model", "strategy", "pipeline", "attention", "launcher")})
    if signature != _compiled_for:
        torch._dynamo.reset()
        _compiled_for = signature
