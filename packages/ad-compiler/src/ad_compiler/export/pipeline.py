"""Compile up to a stage from LlmArgs-like settings: the factory, the shared config and the optimizer in one call."""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from ad_config.transform_config import Stage, TransformConfig, parse_transforms

from ..models.factory import ModelFactory, ModelFactoryRegistry
from ..transform.interface import SharedConfig, TransformInfo, TransformRegistry
from ..transform.optimizer import InferenceOptimizer, ordered_transforms

if TYPE_CHECKING:
    from ad_config import AutoDeployConfig

logger = logging.getLogger(__name__)

DEFAULT_UNTIL = Stage.POST_LOAD_FUSION


def resolve_device(device: str | None) -> str:
    """`auto` (or None): cuda when a GPU is visible, else cpu."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def factory_from_args(args: "AutoDeployConfig", device: str | None = None) -> ModelFactory:
    """The registered factory named by `args.model_factory`, configured from an AutoDeployConfig (or LlmArgs)."""
    cls = ModelFactoryRegistry.get(args.model_factory)
    return cls(
        model=args.model,
        model_kwargs=dict(args.model_kwargs or {}),
        tokenizer=args.tokenizer,
        tokenizer_kwargs=dict(args.tokenizer_kwargs or {}),
        skip_loading_weights=args.skip_loading_weights,
        skip_tokenizer_init=args.skip_tokenizer_init,
        dtype=args.dtype,
        # LlmArgs adds these two to the compiler's AutoDeployConfig
        trust_remote_code=getattr(args, "trust_remote_code", False),
        max_seq_len=args.max_seq_len,
        device=device or resolve_device(args.device),
        seed=getattr(args, "seed", None) or 0,
        cache_dir=args.cache_dir,
    )


@dataclass
class CompileResult:
    """What `compile_until` produced: the module and one TransformInfo per configured transform, in order."""

    module: nn.Module
    history: dict[str, TransformInfo] = field(default_factory=dict)
    factory: ModelFactory | None = None


def compile_until(
    factory: ModelFactory,
    transforms: dict[str, TransformConfig | dict],
    until: str | Stage = DEFAULT_UNTIL,
    shared_config: SharedConfig | None = None,
    allow_unregistered: bool = False,
) -> CompileResult:
    """Run the configured transforms up to and including stage `until`.

    `allow_unregistered`: transforms with no implementation (runtime stages without ad_runtime, or work
    not landed yet) are reported as skipped with the reason instead of failing the run.
    """
    configs = parse_transforms({k: (v.model_dump() if isinstance(v, TransformConfig) else v) for k, v in transforms.items()})
    last = Stage(until).order
    wanted = {n: c for n, c in configs.items() if Stage(c.stage).order <= last}
    missing = [n for n in wanted if not TransformRegistry.has(n)]
    if missing and not allow_unregistered:
        # Let the registry phrase the error (it knows which package provides what).
        TransformRegistry.get(missing[0])
    for name in missing:
        logger.warning("transform %s is not registered; skipped", name)
    optimizer = InferenceOptimizer(factory, {n: c for n, c in wanted.items() if n not in missing})
    module = optimizer(shared_config=shared_config or SharedConfig(device=resolve_device(None)), until=until)
    history: dict[str, TransformInfo] = {}
    for name, cfg in ordered_transforms(wanted):
        info = optimizer.history.get(name)
        if info is None:
            info = TransformInfo(name=name, stage=Stage(cfg.stage).value, skipped=True, reason="not registered")
        history[name] = info
    return CompileResult(module=module, history=history, factory=factory)
