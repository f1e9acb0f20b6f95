"""Typed configs of the runtime's transforms (stages cache_init and compile): one explicit class per transform."""

from typing import Literal

from pydantic import Field, field_validator

from .limits import MAX_BATCH
from .transform_config import Stage, TransformConfig, register_transform_config


# ---- cache and compile -------------------------------------------------------------------------------


KernelBackend = Literal["auto", "torch", "triton", "flashinfer"]


@register_transform_config("insert_cached_attention")
class InsertCachedAttentionConfig(TransformConfig):
    """Swap each torch_attention for the backend's paged-KV-cache attention op."""

    stage: Stage = Stage.CACHE_INIT
    backend: KernelBackend = Field(default="auto", description="Attention kernels: auto is triton on a GPU "
                                   "(flashinfer for an fp8 KV cache, when installed), torch on a CPU.")


@register_transform_config("fuse_rope_into_attention")
class FuseRopeIntoAttentionConfig(TransformConfig):
    """Fold each layer's Triton RoPE of q and k into the triton attention op, which then rotates q and k in the
    kernel that writes the K/V cache (one launch a layer instead of two); skipped for other attention backends."""

    stage: Stage = Stage.CACHE_INIT


# Per-sequence state caches (Mamba2 SSM and conv, gated delta rule, linear attention): "torch" is the only
# implementation today (plain torch, CPU and GPU).
StateBackend = Literal["torch"]


class StateCacheConfig(TransformConfig):
    """Keys of every transform that swaps a state op for its cached version."""

    stage: Stage = Stage.CACHE_INIT
    backend: StateBackend = Field(default="torch", description="State-cache kernels: torch (plain torch, CPU "
                                  "and GPU) is the only one today.")


@register_transform_config("insert_cached_ssm_attention")
class InsertCachedSsmAttentionConfig(StateCacheConfig):
    """Swap torch_ssm (Mamba2 selective scan) for its cached op with per-sequence state."""


@register_transform_config("insert_cached_causal_conv")
class InsertCachedCausalConvConfig(StateCacheConfig):
    """Swap torch_causal_conv1d for its cached op with per-sequence conv state."""


@register_transform_config("insert_cached_gated_delta_rule")
class InsertCachedGatedDeltaRuleConfig(StateCacheConfig):
    """Swap torch_gated_delta_rule for its cached op with per-sequence state."""


@register_transform_config("insert_cached_linear_attention")
class InsertCachedLinearAttentionConfig(StateCacheConfig):
    """Swap torch_linear_attention for its cached op with per-sequence state."""


@register_transform_config("initialize_cache")
class InitializeCacheConfig(TransformConfig):
    """Allocate the paged KV cache and the per-sequence state caches the graph now reads."""

    stage: Stage = Stage.CACHE_INIT


@register_transform_config("gather_logits_before_lm_head")
class GatherLogitsBeforeLmHeadConfig(TransformConfig):
    """Compute the LM head only for each sequence's last token (not every prefill token)."""

    stage: Stage = Stage.CACHE_INIT
    hoist: bool = Field(default=True, description="Gather above the token-wise ops feeding the LM head too (the "
                        "last layer's output projection, norms and MLP and the final norm), so they run on one row "
                        "per sequence; False: gather right before the LM head.")


@register_transform_config("verify_cached_decode")
class VerifyCachedDecodeConfig(TransformConfig):
    """Check once, at build time, that a cached decode step matches a full prefill of the same tokens."""

    stage: Stage = Stage.CACHE_INIT
    tolerance: float | None = Field(default=None, gt=0.0, allow_inf_nan=False, description="Largest allowed "
                                    "max |decode - prefill| / max |prefill| of the last token's logits; None: by "
                                    "dtype (1e-4 float32, 0.05 float16, 0.1 bfloat16, 0.25 fp8 caches).")


@register_transform_config("resize_kv_cache")
class ResizeKvCacheConfig(TransformConfig):
    """Size the KV cache to the memory left after the model is built."""

    stage: Stage = Stage.CACHE_INIT
    free_mem_ratio: float = Field(default=0.8, ge=0.0, le=1.0, allow_inf_nan=False, description="Share of the "
                                  "free GPU memory given to the KV cache.")


@register_transform_config("prepack_cpu_linear")
class PrepackCpuLinearConfig(TransformConfig):
    """On a CPU, run float32 linear layers through oneDNN with their weights packed once at build time (faster
    decode products than MKL on the weights as stored); skipped on other devices."""

    stage: Stage = Stage.COMPILE
    one_row_dense: bool = Field(default=True, description="Keep each packed weight's dense tensor too and multiply "
                                "one-row inputs (batch-1 decode) with it through MKL, faster there than oneDNN; "
                                "costs a second copy of the linear weights (false: packed only).")


@register_transform_config("gemv_decode_linear")
class GemvDecodeLinearConfig(TransformConfig):
    """On a CUDA GPU, run each linear layer through an op that multiplies a one-row input (batch-1 decode) with a
    Triton GEMV (every weight read once, no split-K reduce kernels) and more rows with cuBLAS as before; skipped
    on other devices."""

    stage: Stage = Stage.COMPILE


@register_transform_config("fuse_gemv_swiglu")
class FuseGemvSwigluConfig(TransformConfig):
    """After gemv_decode_linear: a merged gate/up linear followed by silu(gate) * up becomes one op whose one-row
    GEMV writes the activation itself (no activation kernel after it at batch 1); more rows run cuBLAS and one
    activation pass as before. Skipped where gemv_decode_linear did not run (not a GPU)."""

    stage: Stage = Stage.COMPILE


@register_transform_config("fuse_add_rmsnorm_gemv")
class FuseAddRmsnormGemvConfig(TransformConfig):
    """After fuse_gemv_swiglu: a residual add + RMSNorm (the triton add_rmsnorm kernel) whose norm feeds only one
    GEMV op becomes part of that op: at one row a single launch adds, normalises and multiplies (no norm kernel
    before each attention and MLP block at batch 1); more rows run the norm kernel and the linear as before.
    Skipped where gemv_decode_linear did not run (not a GPU) or fuse_add_rmsnorm's backend is not triton."""

    stage: Stage = Stage.COMPILE


CompileBackend = Literal["auto", "torch-simple", "torch-compile", "torch-cudagraph", "torch-opt"]


@register_transform_config("compile_model")
class CompileModelConfig(TransformConfig):
    """Compile the cached graph: Inductor and/or CUDA graphs of decode steps and (piecewise) of prefill steps."""

    stage: Stage = Stage.COMPILE
    backend: CompileBackend = Field(default="auto", description="auto is torch-opt (Inductor + CUDA graphs) on a "
                                    "GPU, torch-simple (eager graph) on a CPU; torch-compile is Inductor alone.")
    cuda_graph_batch_sizes: list[int] | None = Field(
        default=None, description="Decode batch sizes captured as CUDA graphs; None: 1, 2, 4, 8, 16, then steps of 16 "
        "to 128, 32 to 256, 64 to 512... up to max_batch_size (a batch pads by 15 rows or ~25% at most).")
    piecewise_num_tokens: list[int] | None = Field(
        default=None, description="Token counts of prefill and mixed steps captured as piecewise CUDA graphs "
        "(torch-cudagraph, torch-opt): the graph between its attention/state ops is replayed, those ops run "
        "eagerly; a step pads up to the next size, longer steps run without graphs. None: powers of two from 16 "
        "to 1024 (capped by max_num_tokens and max_seq_len); []: off.")

    @field_validator("piecewise_num_tokens")
    @classmethod
    def _token_counts(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 2 for t in v):
            raise ValueError("token counts must be >= 2 (one-token steps are decode steps: cuda_graph_batch_sizes)")
        return sorted(set(v)) if v is not None else None

    @field_validator("cuda_graph_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 < b <= MAX_BATCH for b in v):
            raise ValueError(f"batch sizes must be in [1, {MAX_BATCH}]")
        return sorted(set(v)) if v is not None else None
