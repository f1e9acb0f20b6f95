"""Typed configuration of every graph transform: one pydantic model per registered transform name."""

import difflib
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError
from .limits import MAX_BATCH, MAX_COUNT


class Stage(str, Enum):
    """Pipeline stages in execution order."""

    FACTORY = "factory"
    EXPORT = "export"
    POST_EXPORT = "post_export"
    PATTERN_MATCHER = "pattern_matcher"
    SHARDING = "sharding"
    WEIGHT_LOAD = "weight_load"
    POST_LOAD_FUSION = "post_load_fusion"
    VISUALIZE = "visualize"
    CACHE_INIT = "cache_init"
    COMPILE = "compile"

    @property
    def order(self) -> int:
        return list(Stage).index(self)


class TransformConfig(BaseModel):
    """Keys every transform has. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    stage: Stage
    enabled: bool = True
    skip_on_error: bool = False
    run_graph_cleanup: bool = True
    run_shape_prop: bool = False
    requires_clean_graph: bool = True
    requires_shape_prop: bool = False


TRANSFORM_CONFIGS: dict[str, type[TransformConfig]] = {}


def register_transform_config(name: str):
    """Class decorator: register `cls` as the config model of transform `name`."""

    def wrap(cls: type[TransformConfig]) -> type[TransformConfig]:
        if name in TRANSFORM_CONFIGS:
            raise ValueError(f"transform config {name!r} registered twice")
        TRANSFORM_CONFIGS[name] = cls
        return cls

    return wrap


def closest_name(name: str, choices: list[str]) -> str | None:
    """The most similar valid name, for 'did you mean' hints."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return match[0] if match else None


def transform_config_class(name: str) -> type[TransformConfig]:
    """The config model of transform `name`; a ConfigError with a suggestion if unknown."""
    try:
        return TRANSFORM_CONFIGS[name]
    except KeyError:
        hint = closest_name(name, sorted(TRANSFORM_CONFIGS))
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"unknown transform {name!r}{extra}") from None


def _plain(stage: Stage, *names: str) -> None:
    """Register transforms that take only the common keys."""
    for n in names:
        cls = type(
            "".join(p.capitalize() for p in n.split("_")) + "Config",
            (TransformConfig,),
            {"__annotations__": {"stage": Stage}, "stage": stage, "__module__": __name__},
        )
        register_transform_config(n)(cls)


# ---- factory / export -------------------------------------------------------------------------


@register_transform_config("build_model")
class BuildModelConfig(TransformConfig):
    stage: Stage = Stage.FACTORY


@register_transform_config("export_to_gm")
class ExportToGmConfig(TransformConfig):
    stage: Stage = Stage.EXPORT
    strict: bool = False
    clone_state_dict: bool = False
    # Names of export patches to apply; None applies every registered patch.
    patch_list: list[str] | None = None


_plain(Stage.POST_EXPORT, "cleanup_noop_slice", "cleanup_noop_add", "cleanup_input_constraints")

# ---- pattern matching -------------------------------------------------------------------------

_plain(
    Stage.PATTERN_MATCHER,
    "match_moe_pattern",
    "match_repeat_kv",
    "match_eager_attention",
    "match_sdpa_to_torch_attention",
    "match_grouped_attention",
    "match_rope_pattern",
    "match_rmsnorm_pattern",
    "eliminate_redundant_transposes",
)

AttnLayout = Literal["bsnd", "bnsd"]


@register_transform_config("match_attention_layout")
class MatchAttentionLayoutConfig(TransformConfig):
    stage: Stage = Stage.PATTERN_MATCHER
    attn_layout: AttnLayout = "bsnd"


@register_transform_config("match_rope_layout")
class MatchRopeLayoutConfig(TransformConfig):
    stage: Stage = Stage.PATTERN_MATCHER
    expected_layout: AttnLayout = "bsnd"


# ---- sharding -----------------------------------------------------------------------------------

ShardingSource = Literal["manual", "factory", "heuristic"]
ShardingDim = Literal["tp", "ep", "bmm", "ssm"]
TpStrategy = Literal["colwise", "rowwise", "mamba", "gather"]


class ShardingPlanConfig(BaseModel):
    """A tensor-parallel plan: module-name patterns (with `*`) mapped to strategies."""

    model_config = ConfigDict(extra="forbid")

    head_dim: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    tp_plan: dict[str, TpStrategy] = Field(default_factory=dict)


@register_transform_config("detect_sharding")
class DetectShardingConfig(TransformConfig):
    stage: Stage = Stage.SHARDING
    requires_shape_prop: bool = True
    simple_shard_only: bool = False
    sharding_source: list[ShardingSource] = Field(default_factory=lambda: ["manual", "factory", "heuristic"])
    support_partial_config: bool = True
    sharding_dims: list[ShardingDim] = Field(default_factory=lambda: ["tp", "ep", "bmm"])
    manual_config: ShardingPlanConfig = Field(default_factory=ShardingPlanConfig)
    factory_config: ShardingPlanConfig = Field(default_factory=ShardingPlanConfig)

    @field_validator("sharding_source", "sharding_dims")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v


@register_transform_config("sharding_transform_executor")
class ShardingTransformExecutorConfig(TransformConfig):
    stage: Stage = Stage.SHARDING
    run_shape_prop: bool = True


# ---- weights --------------------------------------------------------------------------------------

_plain(Stage.WEIGHT_LOAD, "load_weights", "move_inputs_to_device")

# ---- fusion ----------------------------------------------------------------------------------------

_plain(Stage.POST_LOAD_FUSION, "fuse_gemms", "fuse_moe")

KernelBackend = Literal["auto", "torch", "triton", "flashinfer"]


@register_transform_config("fuse_rmsnorm")
class FuseRmsnormConfig(TransformConfig):
    stage: Stage = Stage.POST_LOAD_FUSION
    # auto: triton on a GPU, torch on a CPU (there is no FlashInfer RMSNorm kernel here).
    backend: Literal["auto", "torch", "triton"] = "auto"


@register_transform_config("optimize_rope")
class OptimizeRopeConfig(TransformConfig):
    stage: Stage = Stage.POST_LOAD_FUSION
    # auto: triton on a GPU, torch on a CPU.
    backend: Literal["auto", "torch", "triton"] = "auto"


@register_transform_config("visualize_namespace")
class VisualizeNamespaceConfig(TransformConfig):
    stage: Stage = Stage.VISUALIZE
    enabled: bool = False
    # Folder for the written graph files; None means the current directory.
    output_dir: str | None = None


# ---- cache and compile -------------------------------------------------------------------------------


@register_transform_config("insert_cached_attention")
class InsertCachedAttentionConfig(TransformConfig):
    stage: Stage = Stage.CACHE_INIT
    # auto: flashinfer (if installed) or triton on a GPU, torch on a CPU.
    backend: KernelBackend = "auto"


# Per-sequence state caches (Mamba2 SSM and conv, gated delta rule, linear attention): "torch" is the only
# implementation today (plain torch, CPU and GPU).
StateBackend = Literal["torch"]


class StateCacheConfig(TransformConfig):
    """Keys of every transform that swaps a state op for its cached version."""

    stage: Stage = Stage.CACHE_INIT
    backend: StateBackend = "torch"


for _name in ("insert_cached_ssm_attention", "insert_cached_causal_conv", "insert_cached_gated_delta_rule",
              "insert_cached_linear_attention"):
    _cls_name = "".join(p.capitalize() for p in _name.split("_")) + "Config"
    register_transform_config(_name)(type(_cls_name, (StateCacheConfig,), {"__module__": __name__}))


_plain(Stage.CACHE_INIT, "initialize_cache", "gather_logits_before_lm_head")


@register_transform_config("verify_cached_decode")
class VerifyCachedDecodeConfig(TransformConfig):
    stage: Stage = Stage.CACHE_INIT
    # Largest allowed max |decode - prefill| / max |prefill| of the last token's logits; None: by the model
    # model and KV-cache dtypes (1e-4 float32, 0.05 float16, 0.1 bfloat16, 0.25 fp8 caches).
    tolerance: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


@register_transform_config("resize_kv_cache")
class ResizeKvCacheConfig(TransformConfig):
    stage: Stage = Stage.CACHE_INIT
    free_mem_ratio: float = Field(default=0.8, ge=0.0, le=1.0, allow_inf_nan=False)


CompileBackend = Literal["auto", "torch-simple", "torch-compile", "torch-cudagraph", "torch-opt"]


@register_transform_config("compile_model")
class CompileModelConfig(TransformConfig):
    stage: Stage = Stage.COMPILE
    # auto: torch-opt on a GPU, torch-simple on a CPU.
    backend: CompileBackend = "auto"
    # Decode batch sizes captured as CUDA graphs; None: powers of two up to max_batch_size.
    cuda_graph_batch_sizes: list[int] | None = None

    @field_validator("cuda_graph_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 < b <= MAX_BATCH for b in v):
            raise ValueError(f"batch sizes must be in [1, {MAX_BATCH}]")
        return sorted(set(v)) if v is not None else None


def parse_transforms(raw: dict, source: str = "transforms") -> dict[str, TransformConfig]:
    """Validate a `transforms:` mapping into typed configs, keeping its order."""
    out: dict[str, TransformConfig] = {}
    for name, value in (raw or {}).items():
        cls = transform_config_class(name)
        if isinstance(value, TransformConfig):
            value = value.model_dump()
        out[name] = cls.model_validate(value or {})
    return out
