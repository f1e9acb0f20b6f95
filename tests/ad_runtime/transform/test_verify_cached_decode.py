"""verify_cached_decode: a fully cached graph passes; a layer that mixes tokens without a cache fails the build."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_config import ConfigError
from ad_runtime.kv_cache.interface import CachedSequenceInterface
from cached_attention_models import TinyAttentionModel, export_tiny

import ad_runtime  # noqa: F401


class RunningMeanModel(TinyAttentionModel):
    """TinyAttentionModel plus a running mean over the sequence: token mixing that no transform caches
    (what an unsupported linear-attention layer looks like to the runtime)."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        x = x + torch.cumsum(x, dim=1) / (position_ids[..., None] + 1)
        return super().forward(input_ids, position_ids) + self.head(x)


def _run(model: torch.nn.Module, **verify) -> InferenceOptimizer:
    torch.manual_seed(0)
    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=16, page_size=4)
    opt = InferenceOptimizer(None, {"insert_cached_attention": {"backend": "torch"}, "initialize_cache": {},
                                    "verify_cached_decode": verify})
    opt(cm=cm, mod=export_tiny(model))
    return opt


def test_cached_attention_decodes_like_prefill():
    opt = _run(TinyAttentionModel(n_layers=2, sliding_window=5))
    info = opt.history["verify_cached_decode"]
    assert not info.skipped and info.num_matches == 1


def test_uncached_token_mixing_is_a_build_error():
    with pytest.raises(CompileError, match=r"cached decoding disagrees with prefill.*\(limit 0.0001\)"):
        _run(RunningMeanModel())


def test_disabled_or_loose_tolerance_builds_anyway():
    assert _run(RunningMeanModel(), enabled=False).history["verify_cached_decode"].skipped
    assert _run(RunningMeanModel(), tolerance=1e6).history["verify_cached_decode"].num_matches == 1


def test_tolerance_must_be_positive():
    with pytest.raises((ConfigError, ValueError), match="tolerance"):
        _run(TinyAttentionModel(), tolerance=0)


def test_non_finite_logits_skip_the_check_with_a_warning(caplog):
    model = TinyAttentionModel()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with caplog.at_level("WARNING"):
        info = _run(model).history["verify_cached_decode"]
    assert info.skipped and "not finite" in caplog.text
