"""verify_cached_decode: prove the cached graph decodes like it prefills before any request is served.

One short sequence goes through the cached graph twice: as one prefill, and as a shorter prefill followed
by single-token decode steps. With every sequence mixer cached (attention pages, Mamba conv and SSM
state) the last token's logits agree up to rounding. A mixer that no transform cached (linear attention,
an unrecognised recurrent layer) sees only the new token at decode time, and the logits part: that is a
build error, not wrong text. The caches' contents are scratch here; requests overwrite what they use.
"""

import logging

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

from ...kv_cache.interface import CachedSequenceInterface, StepSequence

logger = logging.getLogger(__name__)

NUM_TOKENS = 8  # long enough for a few decode steps, short enough to cost nothing
NUM_DECODE = 3
# max |decode - prefill| / max |prefill| allowed by default: rounding of the compute or cache dtype, with headroom.
# Measured on the CPU (SmolLM2, tiny random models): ~1e-6 in float32, up to ~1.4e-2 in bfloat16; a layer left
# uncached gave 6e-2..7e-2 with random weights (caught strictly in float32 only) and far more with real ones.
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.1}
FP8_TOLERANCE = 0.25  # 1-byte KV caches (fp8): only a gross disagreement is an error


def _embedding_rows(mod: nn.Module) -> int | None:
    """Rows of the graph's token embedding (the vocabulary when no factory says it)."""
    graph = getattr(mod, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
            weight = node.args[0].meta.get("val") if hasattr(node.args[0], "meta") else None
            return int(weight.shape[0]) if weight is not None else None
    return None


def _last_logits(mod: nn.Module, cm: CachedSequenceInterface, seq: StepSequence) -> torch.Tensor:
    cm.update([seq])
    with torch.no_grad():
        logits = mod(**cm.named_args)
    return logits[0, -1].float()


def decode_vs_prefill(mod: nn.Module, cm: CachedSequenceInterface, token_ids: list[int]) -> float | None:
    """Relative max difference of the last token's logits: one prefill vs prefill + NUM_DECODE decodes.

    None when the prefill's logits are not finite (nothing to compare against)."""
    n = len(token_ids)
    pages = list(range(-(-n // cm.info.page_size)))
    whole = _last_logits(mod, cm, StepSequence(token_ids, 0, pages, slot=0))
    first = n - NUM_DECODE
    _last_logits(mod, cm, StepSequence(token_ids[:first], 0, pages, slot=0))
    for pos in range(first, n):
        stepped = _last_logits(mod, cm, StepSequence(token_ids[pos : pos + 1], pos, pages, slot=0))
    if not torch.isfinite(whole).all():
        return None
    d = stepped - whole
    return (d.abs().max() / whole.abs().max().clamp_min(1e-6)).item()


@TransformRegistry.register("verify_cached_decode")
class VerifyCachedDecode(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("verify_cached_decode needs the runtime's CachedSequenceInterface (cm)")
        if (cm.cache_specs or cm.state_specs) and not cm.caches:
            raise CompileError("verify_cached_decode runs after initialize_cache (the caches are not allocated)")
        n = min(NUM_TOKENS, cm.info.max_seq_len, cm.info.max_num_tokens)
        if n <= NUM_DECODE:
            return mod, TransformInfo(skipped=True, reason=f"max_seq_len/max_num_tokens below {NUM_DECODE + 1} tokens")
        # Distinct small ids inside the vocabulary: no two steps see the same token.
        vocab = getattr(factory, "vocab_size", None) or _embedding_rows(mod) or 98
        token_ids = [1 + (7 * i + 3) % min(97, vocab - 1) for i in range(n)]
        dtype = next((p.dtype for p in mod.parameters() if p.is_floating_point()), torch.float32)
        tolerance = self.config.tolerance
        if tolerance is None:
            dtypes = {dtype} | {t.dtype for t in cm.caches.values()}
            tolerance = max(FP8_TOLERANCE if d.itemsize == 1 else DEFAULT_TOLERANCE.get(d, 0.1) for d in dtypes)
        rel = decode_vs_prefill(mod, cm, token_ids)
        if rel is None:
            logger.warning("verify_cached_decode: the model's logits for a test sequence are not finite (NaN or inf; "
                           "random or broken weights?); cached decoding was not checked")
            return mod, TransformInfo(skipped=True, reason="non-finite logits: nothing to compare")
        logger.info("verify_cached_decode: decode vs prefill logits differ by %.2e of their scale (limit %.0e)",
                    rel, tolerance)
        if not rel <= tolerance:  # also catches NaN
            raise CompileError(
                f"cached decoding disagrees with prefill: the last token's logits differ by {rel:.3g} of their "
                f"scale (limit {tolerance:g}); some layer keeps state that "
                "no cache-insertion transform handles (e.g. linear attention) and would decode wrongly. "
                "Set transforms.verify_cached_decode.enabled=false to build anyway"
            )
        return mod, TransformInfo(num_matches=1)
