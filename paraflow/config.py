"""Structured-config schemas for every config group, registered with Hydra's ConfigStore.

Each yaml file in conf/ names its schema in its defaults list, so a misspelt key or a value of
the wrong type fails when Hydra composes the config, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Placement(str, Enum):
    compute = "compute"  # the rank's accelerator (or CPU when there is none)
    cpu = "cpu"


class Offload(str, Enum):
    none = "none"
    cpu = "cpu"  # move the stage's weights to CPU once the stage is done


class Accelerator(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class StageParallel(str, Enum):
    none = "none"  # every rank runs the stage on its own inputs
    patch = "patch"  # the ranks share one image, one band of rows each (patch strategies)
    auto = "auto"  # patch where every rank holds the same image (patch strategies), else none


class Arch(str, Enum):
    sd = "sd"
    sdxl = "sdxl"
    sdxl_refiner = "sdxl_refiner"


class DiTArch(str, Enum):
    pixart_alpha = "pixart_alpha"
    pixart_sigma = "pixart_sigma"
    sd3 = "sd3"
    flux = "flux"


class CacheKind(str, Enum):
    none = "none"
    first_block = "first_block"  # every family: the first block decides, the rest is reused
    deepcache = "deepcache"  # UNets: the deep blocks reused between full steps
    taylorseer = "taylorseer"  # transformers: the rest's residual forecast between full steps


@dataclass
class CacheOptions:
    """Each cache kind's options (paraflow/cache: which kind takes which, and the defaults);
    null: the default."""

    threshold: float | None = None  # first_block: relative change below which it reuses
    interval: int | None = None  # deepcache, taylorseer: a full step every `interval` steps
    order: int | None = None  # taylorseer: the Taylor expansion's order (0: plain reuse)
    warmup: int | None = None  # taylorseer: full steps at the start


class CompileMode(str, Enum):
    none = "none"
    regional = "regional"  # each repeated block compiled on its own (paraflow/compile.py)
    full = "full"  # the stage's whole modules, one graph each where they allow


@dataclass
class CompileOptions:
    """torch.compile's settings for a stage that compiles (paraflow/compile.py)."""

    backend: str = "inductor"  # a torch.compile backend (torch._dynamo.list_backends())
    mode: str | None = None  # inductor's: default, reduce-overhead (CUDA graphs), max-autotune...
    dynamic: bool | None = None  # null: torch's automatic dynamic shapes after a recompile
    fullgraph: bool = False  # true: a graph break fails the run instead of being counted


@dataclass
class StageConfig:
    _target_: str = MISSING
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    precision: Precision = Precision.fp32
    placement: Placement = Placement.compute
    offload: Offload = Offload.none
    parallel: StageParallel = StageParallel.none
    # The stage's own settings (a user-written stage reads its keys from env.spec.options).
    options: dict[str, Any] = field(default_factory=dict)
    # A step cache (denoise stages: paraflow/cache), and its options.
    cache: CacheKind = CacheKind.none
    cache_options: CacheOptions = field(default_factory=lambda: CacheOptions())
    # torch.compile of the stage's modules (denoise and the VAE stages: paraflow/compile.py).
    compile: CompileMode = CompileMode.none
    compile_options: CompileOptions = field(default_factory=lambda: CompileOptions())


@dataclass
class PipelineConfig:
    name: str = "txt2img"
    max_batch: int = 8  # images a rank pushes through the graph at once
    progress: bool = True
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # Models besides the run's `model`, by name (sdxl_refine's refiner); a stage runs on one with
    # options.model=NAME.
    models: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig:
    path: str = MISSING  # a folder with pytorch_lora_weights.safetensors, or the file
    scale: float = 1.0


@dataclass
class AdapterConfig:
    """A LoRA loaded unfused and off: a generation turns it on by name (the run key `lora`), so
    one loaded model serves many adapters (a service's requests choose theirs)."""

    name: str = MISSING
    path: str = MISSING  # as LoraConfig.path


@dataclass
class AdapterChoice:
    name: str = MISSING  # one of model.adapters
    scale: float = 1.0


@dataclass
class TinyModelConfig:
    _target_: str = "paraflow.models.tiny.build_tiny"
    name: str = "tiny"
    arch: Arch = Arch.sd
    init_seed: int = 0
    max_tokens: int = 16
    vocabulary: list[str] | None = None
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: dict[str, Any] = field(default_factory=dict)  # SDXL; empty: as text_encoder
    lora: list[LoraConfig] = field(default_factory=list)  # adapters (paraflow/models/lora.py)
    lora_fuse: bool = False  # merge them into the weights (tensor parallelism needs it)
    adapters: list[AdapterConfig] = field(default_factory=list)  # switched on by `lora`


@dataclass
class TinyDiTModelConfig:
    """A diffusion transformer built from config (paraflow/models/tiny_dit.py)."""

    _target_: str = "paraflow.models.tiny_dit.build_tiny_dit"
    name: str = "tiny_dit"
    arch: DiTArch = DiTArch.pixart_sigma
    init_seed: int = 0
    max_tokens: int = 16
    t5_tokens: int | None = None  # T5's prompt length; None: max_tokens
    vocabulary: list[str] | None = None
    transformer: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)  # a T5Config
    clip: dict[str, Any] = field(default_factory=dict)  # SD3's first CLIP, Flux's only one
    clip_2: dict[str, Any] = field(default_factory=dict)  # SD3's second; empty: as clip
    lora: list[LoraConfig] = field(default_factory=list)  # adapters (paraflow/models/lora.py)
    lora_fuse: bool = False  # merge them into the weights (tensor parallelism needs it)
    adapters: list[AdapterConfig] = field(default_factory=list)  # switched on by `lora`


@dataclass
class PretrainedModelConfig:
    _target_: str = "paraflow.models.pretrained.load_pretrained"
    name: str = "pretrained"
    path: str = MISSING  # a diffusers pipeline folder, or a hub id when the hub is reachable
    variant: str | None = None  # e.g. "fp16" for weights saved as *.fp16.safetensors
    local_files_only: bool = True
    lora: list[LoraConfig] = field(default_factory=list)  # adapters (paraflow/models/lora.py)
    lora_fuse: bool = False  # merge them into the weights (tensor parallelism needs it)
    adapters: list[AdapterConfig] = field(default_factory=list)  # switched on by `lora`


@dataclass
class SchedulerConfig:
    _target_: str = MISSING  # a diffusers scheduler class, built from the model's scheduler config
    name: str = MISSING
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LinkConfig:
    """A modeled interconnect; bandwidth_gb_s=null means the real transport only."""

    bandwidth_gb_s: float | None = None  # GB/s (1e9 bytes/s)
    latency_us: float = 0.0  # per message


@dataclass
class LauncherConfig:
    accelerator: Accelerator = Accelerator.auto
    devices: int = 1
    num_nodes: int = 1
    threads_per_rank: int | None = None  # None: the machine's cores divided among local ranks
    timeout_s: float = 120.0  # a collective waiting longer than this fails the run
    link: LinkConfig = field(default_factory=LinkConfig)


@dataclass
class SDXLConditioning:
    """SDXL's micro-conditioning, as StableDiffusionXLPipeline takes it. null sizes: the image's
    (height, width). The negative ones apply only when both negative sizes are given."""

    original_size: list[int] | None = None
    crops_coords_top_left: list[int] = field(default_factory=lambda: [0, 0])
    target_size: list[int] | None = None
    negative_original_size: list[int] | None = None
    negative_crops_coords_top_left: list[int] = field(default_factory=lambda: [0, 0])
    negative_target_size: list[int] | None = None
    aesthetic_score: float = 6.0  # the refiner's (requires_aesthetics_score) in place of a size
    negative_aesthetic_score: float = 2.5


@dataclass
class AttentionConfig:
    # torch's SDPA (sdpa; sdpa_math/flash/efficient/cudnn: one kernel) or a diffusers dispatch
    # backend (flash, sage, xformers, ...): paraflow/attention.py
    backend: str = "sdpa"


@dataclass
class RunConfig:
    model: Any = MISSING
    scheduler: Any = MISSING
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    strategy: Any = None
    prompt: Any = "a red circle on the left, blue background"
    negative_prompt: str | None = None
    height: int = 64
    width: int = 64
    steps: int = 20
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0  # rescaled classifier-free guidance (0: off), as diffusers'
    clip_skip: int | None = None  # CLIP layers skipped from the end (null: the last layer's)
    sdxl: SDXLConditioning = field(default_factory=SDXLConditioning)
    # Image inputs of pipeline=img2img / inpaint: a path, or one per prompt.
    image: Any = None
    mask: Any = None  # white: repaint, black: keep
    strength: float | None = None  # how far the image is noised, (0, 1]; null: the pipeline's
    denoising_end: float | None = None  # sdxl_refine: where the base hands over, (0, 1)
    lora: list[AdapterChoice] = field(default_factory=list)  # model.adapters on, at their scales
    # Generate at the model's nearest trained aspect-ratio bin, then resize and crop to height ×
    # width, as diffusers' PixArt pipelines do (use_resolution_binning); a no-op for models
    # without bins. output_size: set when it applies (the asked size; height/width: the bin).
    resolution_binning: bool = True
    output_size: list[int] | None = None
    seed: int = 0
    images_per_prompt: int = 1
    save_latents: bool = False
    save_trajectory: bool = False  # latents.safetensors also holds the latents of every step
    output_dir: str | None = None  # None: Hydra's run directory
    plan_only: bool = False  # print the memory/communication plan (paraflow/plan), run nothing
    plan_memory_gb: float | None = None  # the plan's per-device budget (None: CUDA's, if any)
    # first_block: the fraction of the steps after the first that reuse, in [0, 1) (None: 0)
    plan_cache_hit_rate: float | None = None
    serve: Any = None  # the image service (conf/serve); its schema is the service's own


# Model config keys that are not the builder's arguments (applied after it builds the model).
NOT_BUILD_OPTIONS = ("_target_", "name", "lora", "lora_fuse", "adapters")


def build_options(model_cfg: Any) -> tuple[str, dict[str, Any]]:
    """(the builder's import path, its keyword arguments) of a model config."""
    options = plain_dict(model_cfg)
    target = options["_target_"]
    return target, {k: v for k, v in options.items() if k not in NOT_BUILD_OPTIONS}


def plain_dict(node: Any) -> dict[str, Any]:
    """A config node as a plain dict (enums as their names), for passing on as kwargs."""
    container = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    if not isinstance(container, dict):
        raise TypeError(f"expected a mapping config node, got {type(container).__name__}")
    return {str(k): v for k, v in container.items()}


EMBEDDED_MODEL = Path(__file__).resolve().parent / "models" / "embedded"
# `${paraflow_embedded:}` in a model config: the folder of the model that ships in the package.
# Registered at import, so spawned ranks resolve it too.
OmegaConf.register_new_resolver("paraflow_embedded", lambda: str(EMBEDDED_MODEL), replace=True)


CONFIG_GROUP = "paraflow.configs"  # entry points: register(store) for a plugin's configs


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; call before composing (no work at import)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="schemas/model", name="tiny", node=TinyModelConfig)
    store.store(group="schemas/model", name="tiny_dit", node=TinyDiTModelConfig)
    store.store(group="schemas/model", name="pretrained", node=PretrainedModelConfig)
    store.store(group="schemas/scheduler", name="scheduler", node=SchedulerConfig)
    store.store(group="schemas/pipeline", name="pipeline", node=PipelineConfig)
    store.store(group="schemas/launcher", name="launcher", node=LauncherConfig)
    # The strategies' schemas (paraflow/plugin.py) and the service's: core imports neither.
    for plugin in entry_points(group=CONFIG_GROUP):
        plugin.load()(store)
