"""The cache interface (`cm`) as ad-compiler sees it: the runtime's object, passed through to the transforms."""

from typing import Protocol


class CacheInterface(Protocol):
    """What ad-compiler code uses of the runtime's CachedSequenceInterface (`cm`): no member at all.

    The pipeline only hands `cm` on (InferenceOptimizer -> BaseTransform.__call__ -> `_apply`); the compiler's own
    transforms ignore it, and ad-runtime's narrow it to the concrete class (`isinstance`) before using it. ad-compiler
    cannot import that class (imports go one way), so this protocol names the role; add a member here when compiler
    code starts to use one.
    """
