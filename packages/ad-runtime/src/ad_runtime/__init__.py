"""ad_runtime: paged KV cache, attention and compile backends; importing it registers its transforms."""

import ad_compiler.custom_ops  # noqa: F401 - the canonical ops our backends replace

from . import transform as _transform  # noqa: F401
from .transform import library as _library  # noqa: F401 - registers cache_init / compile transforms
from . import kernels as _kernels  # noqa: F401 - registers triton rmsnorm/rope kernel backends
from . import state as _state  # noqa: F401 - registers the cached Mamba2 conv/SSM ops

from .llm import LLM  # noqa: E402
from .outputs import CompletionOutput, RequestOutput  # noqa: E402
from .sampling_params import SamplingParams  # noqa: E402
from .structured_output import StructuredOutputParams  # noqa: E402

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputParams"]
