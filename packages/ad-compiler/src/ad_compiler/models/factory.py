"""The model factory contract and its registry: how the pipeline gets a model, weights and tokenizer."""

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import CompileError


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


class ModelFactoryRegistry:
    """Factories by `model_factory` name."""

    _registry: ClassVar[dict[str, type[ModelFactory]]] = {}

    @classmethod
    def register(cls, name: str):
        def wrap(f: type[ModelFactory]) -> type[ModelFactory]:
            cls._registry[name] = f
            return f

        return wrap

    @classmethod
    def get(cls, name: str) -> type[ModelFactory]:
        from . import hf  # noqa: F401 - registers the built-in factories

        if name not in cls._registry:
            raise CompileError(f"unknown model_factory {name!r}; known: {sorted(cls._registry)}")
        return cls._registry[name]

    @classmethod
    def names(cls) -> list[str]:
        from . import hf  # noqa: F401

        return sorted(cls._registry)
