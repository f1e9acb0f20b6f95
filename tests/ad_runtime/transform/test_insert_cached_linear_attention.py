"""insert_cached_linear_attention: torch_linear_attention gets per-sequence state; outputs equal the uncached model."""

import pytest
import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op, placeholder_names
from ad_runtime.kv_cache.interface import CachedSequenceInterface
from cached_attention_models import export_tiny
from cached_ssm_models import assert_steps_equal_whole_sequences, run_steps, uncached_logits

import ad_runtime  # noqa: F401 - registers the runtime transforms


class TinyLinearAttention(nn.Module):
    """Embedding, `n_layers` residual lightning-style mixers (constant decay per head), lm head."""

    def __init__(self, vocab: int = 32, hidden: int = 16, heads: int = 2, d: int = 4, n_layers: int = 2):
        super().__init__()
        self.h, self.d = heads, d
        self.emb = nn.Embedding(vocab, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, 3 * heads * d) for _ in range(n_layers))
        self.log_decay = nn.ParameterList(nn.Parameter(-torch.rand(heads)) for _ in range(n_layers))
        self.out = nn.ModuleList(nn.Linear(heads * d, hidden) for _ in range(n_layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        b, s, _ = x.shape
        for qkv, decay, out in zip(self.qkv, self.log_decay, self.out):
            q, k, v = torch.nn.functional.silu(qkv(x)).view(b, s, self.h, 3 * self.d).split(self.d, dim=-1)
            y = torch.ops.auto_deploy.torch_linear_attention(q, k, v, decay.view(1, 1, self.h).expand(b, s, self.h))
            x = x + out(y.reshape(b, s, -1))
        return self.head(x)


def _cached(model: nn.Module, max_batch_size: int = 3):
    cm = CachedSequenceInterface(max_batch_size=max_batch_size, max_seq_len=32, page_size=4)
    opt = InferenceOptimizer(None, {"insert_cached_linear_attention": {}, "initialize_cache": {}})
    return opt(cm=cm, mod=export_tiny(model)), cm, opt.history


def test_replaces_ops_and_allocates_state():
    torch.manual_seed(0)
    gm, cm, hist = _cached(TinyLinearAttention().eval())
    assert hist["insert_cached_linear_attention"].num_matches == 2
    assert count_op(gm, torch.ops.auto_deploy.torch_linear_attention) == 0
    assert count_op(gm, torch.ops.auto_deploy.torch_cached_linear_attention) == 2
    assert {"linear_state_0", "linear_state_1", "slot_idx"} <= set(placeholder_names(gm))
    assert cm.caches["linear_state_0"].shape == (4, 2, 4, 4) and cm.caches["linear_state_0"].dtype == torch.float32


def test_mixed_steps_equal_whole_sequences():
    torch.manual_seed(1)
    model = TinyLinearAttention().eval()
    gm, cm, _ = _cached(model)
    assert_steps_equal_whole_sequences(model, gm, cm)


def test_reused_slot_starts_from_zero_state():
    torch.manual_seed(2)
    model = TinyLinearAttention(n_layers=1).eval()
    gm, cm, _ = _cached(model, max_batch_size=1)
    run_steps(gm, cm, [[(0, [1, 2, 3, 4, 5], 0)], [(0, [6], 5)]])
    cm.pool.free(0)
    (out,) = run_steps(gm, cm, [[(0, [4], 0)]])
    torch.testing.assert_close(out[0], uncached_logits(model, [4]), rtol=1e-4, atol=1e-5)


def test_needs_cm():
    with pytest.raises(CompileError, match="CachedSequenceInterface"):
        InferenceOptimizer(None, {"insert_cached_linear_attention": {}})(mod=export_tiny(TinyLinearAttention()))
