"""ExperimentConfig of build_and_run_ad: the LLM args, the prompts to run and the benchmark."""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from .dynamic_yaml import DynamicYamlMixInForSettings, active_resolution
from .error_format import FieldErrors, validation_problems
from .limits import MAX_BATCH, MAX_COUNT, MAX_SEED, MAX_TOKENS
from .llm_args import LlmArgs
from .merge import deep_merge_dicts

DEFAULT_SP_KWARGS: dict[str, Any] = {"max_tokens": 100, "top_k": None, "temperature": 1.0}

DEFAULT_QUERIES: list[str] = [
    "What is the capital of France?",
    "How big is the universe? ",
    "In simple words and a single sentence, explain the concept of gravity: ",
    "How to fix slicing in golf? ",
    "Where is the capital of Iceland? ",
]

# False while a configuration is resolved for a command that runs no prompts (ad-serve): its prompt section then
# leaves max_batch_size alone, so a server's batch is exactly args.max_batch_size.
_RUNS_PROMPTS: ContextVar[bool] = ContextVar("ad_config_runs_prompts", default=True)


@contextmanager
def prompts_not_run() -> Iterator[None]:
    """Resolve configurations, inside this block, for a command that runs no prompts (prompt.* raises nothing)."""
    token = _RUNS_PROMPTS.set(False)
    try:
        yield
    finally:
        _RUNS_PROMPTS.reset(token)


# A query is a plain string, a chat (list of {role, content} messages) or a dict with `prompt` or `messages`.
Query = str | list[dict[str, str]] | dict[str, Any]


class _SamplingKwargsCheck(BaseModel):
    """Bounds of the numeric sampling parameters in prompt.sp_kwargs (other keys are checked by the runtime)."""

    model_config = ConfigDict(extra="allow")

    max_tokens: StrictInt = Field(default=100, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    top_k: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)


class PromptConfig(BaseModel):
    """The prompts build_and_run_ad runs and their sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=2, gt=0, le=MAX_BATCH, description="Number of queries run together.")
    queries: str | list[Query] = Field(
        default_factory=lambda: list(DEFAULT_QUERIES),
        description="Repeated or cut to batch_size; plain strings use the chat template if there is one.",
    )
    sp_kwargs: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SP_KWARGS),
        description="Sampling parameters, deep-merged over the defaults.",
    )

    @field_validator("sp_kwargs", mode="before")
    @classmethod
    def _merge_sp_defaults(cls, value: Any) -> Any:
        return deep_merge_dicts(DEFAULT_SP_KWARGS, value) if isinstance(value, dict) else value

    @field_validator("sp_kwargs")
    @classmethod
    def _check_sp_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        # The runtime checks every sampling parameter again; here the numbers fail before any model is built.
        try:
            _SamplingKwargsCheck.model_validate(value)
        except ValidationError as e:
            raise FieldErrors(validation_problems(e, _SamplingKwargsCheck)) from None
        return value

    @field_validator("queries")
    @classmethod
    def _check_queries(cls, value: str | list[Query]) -> str | list[Query]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("needs at least one query")
        for q in items:
            if isinstance(q, dict) and not ({"prompt", "messages"} & set(q)):
                raise ValueError(f"a query mapping needs 'prompt' or 'messages', got keys {sorted(q)}")
        return value

    def batch(self) -> list[Query]:
        """Exactly batch_size queries: the list repeated or cut."""
        items = [self.queries] if isinstance(self.queries, str) else list(self.queries)
        return [items[i % len(items)] for i in range(self.batch_size)]


class BenchmarkConfig(BaseModel):
    """Timed runs with synthetic prompts of `isl` tokens generating `osl` tokens."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    num: int = Field(default=10, gt=0, le=MAX_COUNT, description="Timed runs after one warm-up.")
    isl: int = Field(default=2048, gt=0, le=MAX_TOKENS, description="Input sequence length.")
    osl: int = Field(default=128, gt=0, le=MAX_TOKENS, description="Output sequence length.")
    bs: int = Field(default=1, gt=0, le=MAX_BATCH, description="Batch size.")
    results_path: str = "./benchmark_results.json"
    store_results: bool = False


class ExperimentConfig(DynamicYamlMixInForSettings):
    """The configuration of build_and_run_ad; `args` is the full LlmArgs."""

    model: str | None = Field(default=None, description="Copied into args.model; None: the bundled SmolLM2.")
    args: LlmArgs = Field(default_factory=dict)  # type: ignore[arg-type]  # built by _build_args
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    dry_run: bool = Field(default=False, description="Print the resolved configuration and exit.")

    @field_validator("args", mode="before")
    @classmethod
    def _build_args(cls, value: Any) -> Any:
        # The outer YAML's `args:` section, environment and command line reach LlmArgs as init
        # kwargs, so they beat its own yaml_extra files; their labels travel with them.
        if isinstance(value, LlmArgs):
            return value.model_copy(deep=True)  # _derive adjusts it; never touch the caller's object
        if not isinstance(value, dict):
            return value
        res = active_resolution(cls)
        origins = res.combined().subtree(("args",)) if res else None
        return LlmArgs.build(value, init_origins=origins, read_env=False, prefix=("args",))

    @model_validator(mode="after")
    def _derive(self) -> "ExperimentConfig":
        res = active_resolution(type(self))
        origins = res.combined() if res else None

        def note(path: tuple[str, ...], label: str) -> None:
            if res is not None:
                res.derived.set(path, label)
                # args' own origin map is merged in after validation; keep it in step.
                self.args.origin_map.set(path[1:], label)

        if self.model is not None:
            if self.args.model != self.model:
                self.args.model = self.model
                note(("args", "model"), f"copied from model <- {origins.get(('model',)) if origins else '?'}")
        elif self.args.model is not None:
            self.model = self.args.model

        raises = [(self.prompt.batch_size, "prompt.batch_size")] if _RUNS_PROMPTS.get() else []
        if self.benchmark.enabled:
            raises.append((self.benchmark.bs, "benchmark.bs"))
        for size, why in raises:
            if size > self.args.max_batch_size:
                self.args.max_batch_size = size
                note(("args", "max_batch_size"), f"raised to {why}")
        if self.benchmark.enabled:
            need = self.benchmark.isl + self.benchmark.osl
            if need > MAX_TOKENS:
                raise ValueError(f"benchmark.isl + benchmark.osl ({need}) exceeds {MAX_TOKENS} tokens")
            if need > self.args.max_seq_len:
                self.args.max_seq_len = need
                note(("args", "max_seq_len"), "raised to benchmark.isl + benchmark.osl")
        self.args.check_limits()
        return self
