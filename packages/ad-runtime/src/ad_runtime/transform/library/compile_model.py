"""compile_model: wrap the cached graph with a compile backend (torch-simple/-compile/-cudagraph/-opt).

Before: gm(**cm.named_args)        After: compiled(**cm.named_args)  (same outputs; decode steps may replay
CUDA graphs of padded batch sizes, prefill and mixed steps piecewise CUDA graphs of padded token counts)
"""

import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

from ...compile import compile_model
from ...kv_cache.interface import CachedSequenceInterface


@TransformRegistry.register("compile_model")
class CompileModel(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("compile_model needs the runtime's CachedSequenceInterface (cm)")
        compiled = compile_model(mod, cm, self.config.backend, self.config.cuda_graph_batch_sizes,
                                 self.config.piecewise_num_tokens)
        return compiled, TransformInfo(num_matches=int(compiled is not mod))
