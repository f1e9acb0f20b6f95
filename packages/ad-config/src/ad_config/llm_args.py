"""AutoDeployConfig (what the compiler pipeline needs) and LlmArgs (plus runtime options)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .backends import gpu_only_problems
from .dynamic_yaml import DynamicYamlMixInForSettings, active_resolution
from .error_format import NO_VALUE, FieldErrors, validation_problems
from .errors import ConfigError
from .limits import MAX_BATCH, MAX_SEED, MAX_TOKENS, MAX_WORLD_SIZE, bad_model_counts
from .merge import Path
from .transform_config import (
    CompileBackend,
    KernelBackend,
    TransformConfig,
    parse_transforms,
    transform_config_class,
)
from .yaml_files import BUILTIN_DEFAULT_YAML

Dtype = Literal["auto", "float32", "float16", "bfloat16"]

# Shortcut field -> (transform, key) it mirrors.
SHORTCUTS: dict[str, tuple[str, str]] = {
    "attn_backend": ("insert_cached_attention", "backend"),
    "compile_backend": ("compile_model", "backend"),
    "free_mem_ratio": ("resize_kv_cache", "free_mem_ratio"),
    "cuda_graph_batch_sizes": ("compile_model", "cuda_graph_batch_sizes"),
}


class AutoDeployConfig(DynamicYamlMixInForSettings):
    """Everything the compile pipeline (model factory + transforms) needs; defaults from default.yaml."""

    yaml_default: str | None = str(BUILTIN_DEFAULT_YAML)

    # ---- model -------------------------------------------------------------------------------
    model: str | None = Field(
        default=None, description="Hub id, local folder or GGUF file; None: the bundled SmolLM2-135M-Instruct."
    )
    model_factory: str = Field(default="AutoModelForCausalLM", description="Registered model factory name.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the model config; nested sub-configs merge."
    )
    skip_loading_weights: bool = Field(default=False, description="Random weights instead of the checkpoint.")
    tokenizer: str | None = Field(default=None, description="Tokenizer to load; None: the model's.")
    tokenizer_kwargs: dict[str, Any] = Field(default_factory=dict)
    skip_tokenizer_init: bool = False
    cache_dir: str | None = Field(
        default=None,
        description="Folder for converted checkpoints (a .gguf file or the bundled model, dequantised once); "
        "None: $AD_CACHE_DIR, else ~/.cache/ad_autodeploy.",
    )
    build_cache: bool = Field(
        default=True,
        description="Reuse the exported, transformed and sharded graph of an earlier build with the same "
        "configuration, checkpoint files, rank, device kind and package versions: export and the graph transforms "
        "are skipped, weights still load from the checkpoint. false: always build from scratch.",
    )
    build_cache_dir: str | None = Field(
        default=None, description="Folder of the build cache's entries (one file per rank); None: <cache_dir>/builds."
    )

    # ---- placement -----------------------------------------------------------------------------
    world_size: int = Field(default=1, ge=1, le=MAX_WORLD_SIZE, description="Number of ranks (one process per GPU).")
    # Resolved by the runtime (cuda if available, else cpu): this package never imports torch.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Dtype = Field(default="auto", description="auto: the checkpoint's dtype.")
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16", "fp8"] = "auto"
    mode: Literal["graph"] = Field(
        default="graph",
        description="graph: export the model with torch.export and optimize its graph (the only mode for now).",
    )

    # ---- pipeline ------------------------------------------------------------------------------
    transforms: dict[str, SerializeAsAny[TransformConfig]] = Field(
        default_factory=dict, description="Transform name -> its config; defaults from default.yaml."
    )
    # Shortcuts: None means 'not set here' and is replaced by the transform's value after validation.
    attn_backend: KernelBackend | None = None
    compile_backend: CompileBackend | None = None
    free_mem_ratio: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    cuda_graph_batch_sizes: list[Annotated[int, Field(gt=0, le=MAX_BATCH)]] | None = None

    # ---- sequence limits -----------------------------------------------------------------------
    attn_page_size: int = Field(default=64, gt=0, le=MAX_TOKENS, description="Tokens per KV-cache page.")
    max_input_len: int | None = Field(
        default=None, gt=0, le=MAX_TOKENS, description="Longest prompt; None: max_seq_len."
    )
    max_num_tokens: int | None = Field(
        default=None, gt=0, le=MAX_TOKENS,
        description="Most tokens in one forward pass; None: max_batch_size * max_seq_len.",
    )
    max_seq_len: int = Field(default=512, gt=0, le=MAX_TOKENS)
    max_batch_size: int = Field(default=8, gt=0, le=MAX_BATCH)
    enable_chunked_prefill: bool = False

    @field_validator("model_kwargs")
    @classmethod
    def _check_model_counts(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Layer and head counts fail here, not as a model without layers (blank answers) or a division by zero.
        problems = bad_model_counts(value)
        if problems:
            raise FieldErrors(problems)
        return value

    @field_validator("transforms", mode="before")
    @classmethod
    def _parse_transforms(cls, value: Any) -> dict[str, TransformConfig]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of transform name to its settings")
        out: dict[str, TransformConfig] = {}
        problems: list[tuple[Path, str, Any]] = []
        for name, cfg in value.items():
            try:
                out.update(parse_transforms({name: cfg}))
            except ConfigError as e:
                problems.append(((name,), str(e), NO_VALUE))
            except ValidationError as e:
                problems += validation_problems(e, transform_config_class(name), (name,))
        if problems:
            raise FieldErrors(problems)
        return out

    @model_validator(mode="after")
    def _sync_shortcuts(self) -> "AutoDeployConfig":
        res = active_resolution(type(self))
        origins = res.combined() if res else None
        for short, (name, key) in SHORTCUTS.items():
            value = getattr(self, short)
            cfg = self.transforms.get(name)
            if value is not None:
                # An explicitly set shortcut wins and is written into the transform config.
                if cfg is None:
                    cfg = self.transforms[name] = transform_config_class(name)()
                try:
                    setattr(cfg, key, value)
                except ValidationError as e:
                    raise ValueError(f"{short}: {e.errors()[0]['msg']}") from None
                if res is not None:
                    res.derived.set(("transforms", name, key), f"shortcut {short} <- {origins.get((short,))}")
            elif cfg is not None:
                src = origins.get(("transforms", name, key)) if origins else None
                if res is not None and src is not None:
                    res.derived.set((short,), f"transforms.{name}.{key} <- {src}")
            if cfg is not None:  # the shortcut shows the transform's (normalised: sorted batch sizes) value
                setattr(self, short, getattr(cfg, key))
        self.check_limits()
        if self.device == "cpu":
            # Refused here, in seconds, rather than by the build after half a minute of work.
            problems = gpu_only_problems(self, "device 'cpu'")
            if problems:
                raise FieldErrors(problems)
        return self

    def check_limits(self) -> None:
        """Cross-field rules; call again after changing limits in place."""
        if getattr(self, "overlap_scheduler", None) and self.world_size > 1:
            raise ValueError(
                f"overlap_scheduler: true needs world_size 1 (got {self.world_size}): the other ranks would need the "
                "sampled ids on their devices; leave it unset (auto) or false"
            )
        if self.max_seq_len > MAX_TOKENS:  # raised by a derived value (benchmark.isl + benchmark.osl)
            raise ValueError(f"max_seq_len ({self.max_seq_len}) exceeds {MAX_TOKENS}")
        if self.max_batch_size > MAX_BATCH:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) exceeds {MAX_BATCH}")
        if self.max_input_len is not None and self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) exceeds max_seq_len ({self.max_seq_len})")
        if self.max_num_tokens is None and self.max_batch_size * self.max_seq_len > MAX_TOKENS:
            raise ValueError(
                f"max_batch_size * max_seq_len ({self.max_batch_size} * {self.max_seq_len}) exceeds {MAX_TOKENS} "
                "tokens per forward pass; set max_num_tokens"
            )


class SamplingDefaults(BaseModel):
    """Sampling parameters used where a request does not give its own."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=100, gt=0, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False, description="0: greedy.")
    top_k: int | None = Field(default=None, gt=0, le=MAX_TOKENS, description="None: no top-k cut.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)


class KvCacheConfig(BaseModel):
    """Bounds on the paged KV cache beyond what resize_kv_cache measures."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        default=None, gt=0, le=MAX_TOKENS,
        description="Upper bound on cached tokens; None: as many as free_mem_ratio allows.",
    )


class LlmArgs(AutoDeployConfig):
    """Every option of the `LLM(...)` API: the pipeline's AutoDeployConfig plus runtime options."""

    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Seed of the random sampler (and of random weights), 0 to 2**64-1."
    )
    dist_timeout: float = Field(
        default=60.0, gt=0.0, le=86400.0, allow_inf_nan=False,
        description="Seconds a rank may stop answering (dead, stopped, stuck in a collective) before the whole "
        "multi-process run ends with that rank's error.",
    )
    overlap_scheduler: bool | None = Field(
        default=None,
        description="Prepare and launch step N+1 while the GPU runs step N (sampled ids stay on the device, the "
        "host reads them one step late). None: on for a single-process run on a GPU, off on a CPU (no gain there). "
        "Greedy tokens are the same either way. Needs world_size 1.",
    )
    engine_process: bool | None = Field(
        default=None,
        description="Run the engine (scheduler, model, sampling) in a process of its own, as rank 0 of a "
        "one-rank launch; the caller's process keeps tokenization, detokenization and I/O. ad-serve's HTTP work "
        "and the engine's stepping then stop taking turns on one Python interpreter. None: on for ad-serve on a "
        "GPU, off otherwise (LLM, build_and_run_ad, a CPU). world_size > 1 always runs the engine in rank 0's "
        "process.",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV-cache pages of prompt prefixes that earlier requests computed (full pages, "
        "least recently used evicted first). Models with recurrent state (Mamba, linear attention) run without "
        "reuse. Greedy tokens are the same either way.",
    )
    trust_remote_code: bool = False
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig)
