"""Typed configs of the compiler's transforms (stages factory to visualize): one explicit class per transform."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .limits import MAX_COUNT
from .transform_config import Stage, TransformConfig, register_transform_config


# ---- factory / export -------------------------------------------------------------------------


@register_transform_config("build_model")
class BuildModelConfig(TransformConfig):
    """Build the model from its factory on the meta device (no weights read)."""

    stage: Stage = Stage.FACTORY


@register_transform_config("export_to_gm")
class ExportToGmConfig(TransformConfig):
    """Capture the model with torch.export into an FX GraphModule (dynamic batch and sequence length)."""

    stage: Stage = Stage.EXPORT
    strict: bool = Field(default=False, description="torch.export's strict mode (trace with TorchDynamo).")
    clone_state_dict: bool = Field(default=False, description="Give the graph its own copy of the model's "
                                                              "parameters and buffers.")
    patch_list: list[str] | None = Field(default=None, description="Export patches to apply (they swap "
                                         "untraceable model code for canonical ops); None applies every "
                                         "registered patch.")


@register_transform_config("cleanup_noop_slice")
class CleanupNoopSliceConfig(TransformConfig):
    """Remove slices that keep a whole dimension (x[:, :])."""

    stage: Stage = Stage.POST_EXPORT


@register_transform_config("cleanup_noop_to")
class CleanupNoopToConfig(TransformConfig):
    """Remove casts to the dtype a tensor already has (x.to(x.dtype))."""

    stage: Stage = Stage.POST_EXPORT


@register_transform_config("cleanup_noop_add")
class CleanupNoopAddConfig(TransformConfig):
    """Remove additions of a zero constant."""

    stage: Stage = Stage.POST_EXPORT


@register_transform_config("cleanup_input_constraints")
class CleanupInputConstraintsConfig(TransformConfig):
    """Drop export's range asserts on the batch and sequence dimensions of the inputs."""

    stage: Stage = Stage.POST_EXPORT


# ---- pattern matching -------------------------------------------------------------------------

@register_transform_config("match_moe_pattern")
class MatchMoePatternConfig(TransformConfig):
    """Replace routed mixture-of-experts subgraphs by torch_moe."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("match_repeat_kv")
class MatchRepeatKvConfig(TransformConfig):
    """Recognise repeat_kv (grouped-query key/value expansion) ahead of attention matching."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("match_eager_attention")
class MatchEagerAttentionConfig(TransformConfig):
    """Replace eager softmax(QK^T)V attention subgraphs by torch_attention."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("match_sdpa_to_torch_attention")
class MatchSdpaToTorchAttentionConfig(TransformConfig):
    """Replace scaled_dot_product_attention calls by torch_attention."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("match_grouped_attention")
class MatchGroupedAttentionConfig(TransformConfig):
    """Fold repeat_kv into torch_attention (grouped-query attention reads the KV heads once)."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("match_rope_pattern")
class MatchRopePatternConfig(TransformConfig):
    """Replace RoPE subgraphs (rotate-half, interleaved, complex) by torch_rope_* ops."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("match_rmsnorm_pattern")
class MatchRmsnormPatternConfig(TransformConfig):
    """Replace RMSNorm subgraphs by torch_rmsnorm."""

    stage: Stage = Stage.PATTERN_MATCHER


@register_transform_config("eliminate_redundant_transposes")
class EliminateRedundantTransposesConfig(TransformConfig):
    """Remove transpose pairs that cancel (left around attention by layout changes)."""

    stage: Stage = Stage.PATTERN_MATCHER


AttnLayout = Literal["bsnd", "bnsd"]


@register_transform_config("match_attention_layout")
class MatchAttentionLayoutConfig(TransformConfig):
    """Rewrite torch_attention calls to the layout the cached attention backends expect."""

    stage: Stage = Stage.PATTERN_MATCHER
    attn_layout: AttnLayout = Field(default="bsnd", description="Tensor layout of attention inputs: bsnd "
                                    "(batch, sequence, heads, head dim) or bnsd.")


@register_transform_config("match_rope_layout")
class MatchRopeLayoutConfig(TransformConfig):
    """Rewrite torch_rope_* calls to the layout attention uses, so no transposes surround them."""

    stage: Stage = Stage.PATTERN_MATCHER
    expected_layout: AttnLayout = Field(default="bsnd", description="Layout RoPE inputs and outputs should have: "
                                        "bsnd or bnsd.")


# ---- sharding -----------------------------------------------------------------------------------

ShardingSource = Literal["manual", "factory", "heuristic"]
ShardingDim = Literal["tp", "ep", "bmm", "ssm"]
TpStrategy = Literal["colwise", "rowwise", "mamba", "gather"]


class ShardingPlanConfig(BaseModel):
    """A tensor-parallel plan: module-name patterns (with `*`) mapped to strategies."""

    model_config = ConfigDict(extra="forbid")

    head_dim: int | None = Field(default=None, gt=0, le=MAX_COUNT, description="Attention head size, when the "
                                 "plan shards heads and the model config does not say it.")
    tp_plan: dict[str, TpStrategy] = Field(default_factory=dict, description="Module-name pattern (with `*`) -> "
                                           "colwise, rowwise, mamba or gather.")


@register_transform_config("detect_sharding")
class DetectShardingConfig(TransformConfig):
    """Decide how each weight is split over the ranks (the sharding plan); world_size 1 skips it."""

    stage: Stage = Stage.SHARDING
    requires_shape_prop: bool = True
    simple_shard_only: bool = Field(default=False, description="Shard every linear layer column-wise and gather "
                                    "its output (always correct, more communication).")
    sharding_source: list[ShardingSource] = Field(
        default_factory=lambda: ["manual", "factory", "heuristic"],
        description="Where plans come from, in priority order: manual_config, the model's own plan, heuristics.")
    support_partial_config: bool = Field(default=True, description="Let later sources shard what an earlier, "
                                         "partial plan left out.")
    sharding_dims: list[ShardingDim] = Field(default_factory=lambda: ["tp", "ep", "bmm"], description="Kinds of "
                                             "sharding the heuristics may use: tensor, expert, batched-matmul "
                                             "experts, Mamba (ssm).")
    manual_config: ShardingPlanConfig = Field(default_factory=ShardingPlanConfig, description="A plan given by "
                                              "the user.")
    factory_config: ShardingPlanConfig = Field(default_factory=ShardingPlanConfig, description="A plan that "
                                               "overrides the model's own (its tp_plan in the config).")

    @field_validator("sharding_source", "sharding_dims")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v


@register_transform_config("sharding_transform_executor")
class ShardingTransformExecutorConfig(TransformConfig):
    """Apply the sharding plan: slice weights per rank and insert the collectives."""

    stage: Stage = Stage.SHARDING
    run_shape_prop: bool = True


# ---- weights --------------------------------------------------------------------------------------


@register_transform_config("load_weights")
class LoadWeightsConfig(TransformConfig):
    """Load the checkpoint into the (sharded) graph's parameters, shard by shard."""

    stage: Stage = Stage.WEIGHT_LOAD


@register_transform_config("move_inputs_to_device")
class MoveInputsToDeviceConfig(TransformConfig):
    """Put every tensor the graph reads, and its device constants, on the target device."""

    stage: Stage = Stage.WEIGHT_LOAD


# ---- fusion ----------------------------------------------------------------------------------------


@register_transform_config("fuse_gemms")
class FuseGemmsConfig(TransformConfig):
    """Fuse linear layers that read the same input (q/k/v, gate/up) into one GEMM."""

    stage: Stage = Stage.POST_LOAD_FUSION


@register_transform_config("fuse_moe")
class FuseMoeConfig(TransformConfig):
    """Stack per-expert weights so torch_moe runs as torch_moe_fused."""

    stage: Stage = Stage.POST_LOAD_FUSION


class FusionKernelConfig(TransformConfig):
    """Keys of every fusion that swaps a pattern for one kernel of a chosen backend."""

    stage: Stage = Stage.POST_LOAD_FUSION
    backend: Literal["auto", "torch", "triton"] = Field(default="auto", description="Kernel of the fused op: auto "
                                                         "is triton on a GPU, torch on a CPU.")


@register_transform_config("fuse_rmsnorm")
class FuseRmsnormConfig(FusionKernelConfig):
    """Swap torch_rmsnorm for the chosen backend's single-kernel RMSNorm."""


@register_transform_config("fuse_add_rmsnorm")
class FuseAddRmsnormConfig(FusionKernelConfig):
    """Fuse each residual add with the RMSNorm that reads it into one kernel returning the norm and the sum."""


@register_transform_config("optimize_rope")
class OptimizeRopeConfig(FusionKernelConfig):
    """Turn rotate-half RoPE with cos/sin tensors into one kernel reading a cos/sin cache at position ids."""


@register_transform_config("visualize_namespace")
class VisualizeNamespaceConfig(TransformConfig):
    """Write the graph as text (and SVG when graphviz is installed) for inspection."""

    stage: Stage = Stage.VISUALIZE
    enabled: bool = Field(default=False, description="Write the graph files (off by default).")
    output_dir: str | None = Field(default=None, description="Folder for the graph files; None: the current "
                                   "directory.")
