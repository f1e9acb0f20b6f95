"""The transform framework: base class, registry and the stage-ordered pipeline."""

from .interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from .optimizer import InferenceOptimizer

__all__ = ["BaseTransform", "InferenceOptimizer", "SharedConfig", "TransformInfo", "TransformRegistry"]
