"""The model factory contract and its registry: how the pipeline gets a model, weights and tokenizer."""

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn as nn
from ad_config import ConfigError
from ad_config.limits import MODEL_COUNT_KEYS, is_model_count

from ..errors import CompileError
from ..registry import Registry


class ModelConfigError(CompileError, ConfigError):
    """A `model_kwargs` override makes the model config unusable: a configuration mistake (exit code 2 in
    build_and_run_ad), and still a CompileError for callers that catch those."""


def check_model_config(base: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    """Refuse count/size fields (MODEL_COUNT_KEYS) that are not positive integers and head counts that do not
    divide. A zero or negative count otherwise builds a model without layers (blank answers) or divides by
    zero deep inside transformers.

    `base` is the checkpoint's config dict (from `source`, e.g. its config.json), `overrides` the
    user's `model_kwargs`. A bad value that an override set raises ModelConfigError naming
    `model_kwargs.<key>`; one from the checkpoint raises CompileError naming `source`.
    Sub-configs (`text_config`, ...) are checked the same way.
    """
    _check_level(base, overrides, source, "")


def _blame(key_path: str, from_override: bool, source: str, message: str) -> CompileError:
    if from_override:
        return ModelConfigError(f"model_kwargs.{key_path}: {message}")
    return CompileError(f"{source}: {key_path}: {message} (the model's own config)")


def _check_level(base: dict[str, Any], overrides: dict[str, Any], source: str, prefix: str) -> None:
    def value(key: str) -> tuple[Any, bool]:
        if key in overrides:
            return overrides[key], True
        return base.get(key), False

    for key in MODEL_COUNT_KEYS:
        v, from_override = value(key)
        if v is not None and not is_model_count(v):
            raise _blame(prefix + key, from_override, source, f"must be a positive integer, got {v!r}")
    (heads, o_heads), (kv, o_kv) = value("num_attention_heads"), value("num_key_value_heads")
    # Divisibility only between plain counts (absent or per-layer lists: nothing to check).
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise _blame(
            prefix + ("num_key_value_heads" if o_kv or not o_heads else "num_attention_heads"), o_heads or o_kv,
            source, f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})",
        )
    (hidden, o_hidden), (head_dim, _) = value("hidden_size"), value("head_dim")
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise _blame(
            prefix + ("hidden_size" if o_hidden or not o_heads else "num_attention_heads"), o_hidden or o_heads,
            source,
            f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) when head_dim is unset",
        )
    _check_sub_configs(base, overrides, source, prefix)


def _check_sub_configs(base: dict[str, Any], overrides: dict[str, Any], source: str, prefix: str) -> None:
    for key in sorted(k for k in set(base) | set(overrides) if isinstance(k, str)):
        if not key.endswith("_config") or key == "quantization_config":
            continue
        sub_base, sub_over = base.get(key), overrides.get(key)
        if isinstance(sub_over, dict) or isinstance(sub_base, dict):
            _check_level(
                sub_base if isinstance(sub_base, dict) else {},
                sub_over if isinstance(sub_over, dict) else {},
                source, f"{prefix}{key}.",
            )


class ModelFactory(ABC):
    """Builds one model: structure on any device (usually meta), weights loaded separately.

    Weights are loaded *after* the graph is sharded: `load_or_random_init` runs with load hooks
    registered on the (graph) module, so each rank slices full checkpoint tensors on the fly.
    """

    def __init__(
        self,
        model: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        skip_loading_weights: bool = False,
        skip_tokenizer_init: bool = False,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        max_seq_len: int = 512,
        **kwargs: Any,
    ):
        self.model_name = model
        self.model_kwargs = dict(model_kwargs or {})
        self.tokenizer_name = tokenizer
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self.skip_loading_weights = skip_loading_weights
        self.skip_tokenizer_init = skip_tokenizer_init
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.max_seq_len = max_seq_len
        self.extra_kwargs = kwargs

    @abstractmethod
    def build_model(self, device: str | torch.device) -> nn.Module:
        """The model with its final config and dtype, parameters on `device` (uninitialised on meta)."""

    @abstractmethod
    def load_or_random_init(self, model: nn.Module, device: str | torch.device) -> None:
        """Fill `model`'s parameters and buffers on `device`: from the checkpoint, or randomly."""

    @abstractmethod
    def init_tokenizer(self) -> Any | None:
        """The tokenizer (None when skip_tokenizer_init is set)."""

    @abstractmethod
    def get_example_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword inputs for export: `input_ids` and `position_ids`, both [batch, seq]."""

    def get_sharding_config(self) -> dict[str, Any]:
        """The model's own tensor-parallel plan (module pattern -> strategy), head_dim etc."""
        return {}

    @property
    def vocab_size(self) -> int | None:
        return None


# Factories by `model_factory` name (the built-ins register in models/hf.py).
ModelFactoryRegistry: Registry[type[ModelFactory]] = Registry("model_factory")
