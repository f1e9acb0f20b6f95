"""insert_cached_gated_delta_rule: torch_gated_delta_rule gets per-sequence state; outputs equal the uncached model."""

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


class TinyDeltaNet(nn.Module):
    """Embedding, `n_layers` residual delta-net mixers (projections -> gated delta rule -> out_proj), lm head."""

    def __init__(self, vocab: int = 32, hidden: int = 16, heads: int = 2, dk: int = 4, dv: int = 3, n_layers: int = 2):
        super().__init__()
        self.h, self.dk, self.dv = heads, dk, dv
        self.emb = nn.Embedding(vocab, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, heads * (2 * dk + dv)) for _ in range(n_layers))
        self.ab = nn.ModuleList(nn.Linear(hidden, 2 * heads) for _ in range(n_layers))
        self.out = nn.ModuleList(nn.Linear(heads * dv, hidden) for _ in range(n_layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        b, s, _ = x.shape
        for qkv, ab, out in zip(self.qkv, self.ab, self.out):
            q, k, v = qkv(x).split([self.h * self.dk, self.h * self.dk, self.h * self.dv], dim=-1)
            a, beta = ab(x).chunk(2, dim=-1)
            y = torch.ops.auto_deploy.torch_gated_delta_rule(
                q.view(b, s, self.h, self.dk), k.view(b, s, self.h, self.dk), v.view(b, s, self.h, self.dv),
                -torch.nn.functional.softplus(a), beta.sigmoid(), True,
            )
            x = x + out(y.reshape(b, s, -1))
        return self.head(x)


def _cached(model: nn.Module, max_batch_size: int = 3):
    cm = CachedSequenceInterface(max_batch_size=max_batch_size, max_seq_len=32, page_size=4)
    opt = InferenceOptimizer(None, {"insert_cached_gated_delta_rule": {}, "initialize_cache": {}})
    return opt(cm=cm, mod=export_tiny(model)), cm, opt.history


def test_replaces_ops_and_allocates_state():
    torch.manual_seed(0)
    gm, cm, hist = _cached(TinyDeltaNet().eval())
    assert hist["insert_cached_gated_delta_rule"].num_matches == 2
    assert count_op(gm, torch.ops.auto_deploy.torch_gated_delta_rule) == 0
    assert count_op(gm, torch.ops.auto_deploy.torch_cached_gated_delta_rule) == 2
    assert {"delta_state_0", "delta_state_1", "slot_idx"} <= set(placeholder_names(gm))
    # One row per running sequence plus the scratch row; heads x k_head_dim x v_head_dim, float32.
    assert cm.caches["delta_state_0"].shape == (4, 2, 4, 3) and cm.caches["delta_state_0"].dtype == torch.float32


def test_mixed_steps_equal_whole_sequences():
    """Prefills, a chunked prefill continuing from its state, decodes in another slot order: every output row
    equals the uncached model on the whole sequence so far."""
    torch.manual_seed(1)
    model = TinyDeltaNet().eval()
    gm, cm, _ = _cached(model)
    assert_steps_equal_whole_sequences(model, gm, cm)


def test_reused_slot_starts_from_zero_state():
    torch.manual_seed(2)
    model = TinyDeltaNet(n_layers=1).eval()
    gm, cm, _ = _cached(model, max_batch_size=1)
    run_steps(gm, cm, [[(0, [1, 2, 3, 4, 5], 0)], [(0, [6], 5)]])
    cm.pool.free(0)
    (out,) = run_steps(gm, cm, [[(0, [4], 0)]])  # a one-token prompt runs with the decodes: from zeros
    torch.testing.assert_close(out[0], uncached_logits(model, [4]), rtol=1e-4, atol=1e-5)


def test_needs_cm_and_skips_graphs_without_the_op():
    gm = export_tiny(TinyDeltaNet())
    with pytest.raises(CompileError, match="CachedSequenceInterface"):
        InferenceOptimizer(None, {"insert_cached_gated_delta_rule": {}})(mod=gm)
    from cached_attention_models import TinyAttentionModel

    cm = CachedSequenceInterface(max_batch_size=1, max_seq_len=8, page_size=4)
    opt = InferenceOptimizer(None, {"insert_cached_gated_delta_rule": {}})
    opt(cm=cm, mod=export_tiny(TinyAttentionModel()))
    assert opt.history["insert_cached_gated_delta_rule"].skipped
