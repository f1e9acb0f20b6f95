"""insert_cached_causal_conv: torch_causal_conv1d becomes the cached op with per-sequence conv state."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op
from ad_runtime.kv_cache.interface import CachedSequenceInterface
from cached_attention_models import export_tiny
from cached_ssm_models import TinyMambaModel, run_steps

import ad_runtime  # noqa: F401 - registers the runtime transforms


class ConvOnly(torch.nn.Module):
    """Embedding -> causal conv -> lm head: the output at t depends on exactly the last `kernel` tokens."""

    def __init__(self, vocab: int = 32, hidden: int = 8, kernel: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.w = torch.nn.Parameter(torch.randn(hidden, kernel))
        self.b = torch.nn.Parameter(torch.randn(hidden))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.ops.auto_deploy.torch_causal_conv1d(self.emb(input_ids), self.w, self.b))


def _cached(model):
    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=32, page_size=4)
    opt = InferenceOptimizer(None, {"insert_cached_causal_conv": {}, "initialize_cache": {}})
    return opt(cm=cm, mod=export_tiny(model)), cm, opt.history


def test_replaces_op_and_allocates_state():
    gm, cm, hist = _cached(TinyMambaModel(n_layers=3))
    assert hist["insert_cached_causal_conv"].num_matches == 3
    assert count_op(gm, torch.ops.auto_deploy.torch_causal_conv1d) == 0
    assert count_op(gm, torch.ops.auto_deploy.torch_cached_causal_conv1d) == 3
    conv_dim = 4 * 4 + 2 * 2 * 3
    assert cm.caches["conv_state_2"].shape == (3, conv_dim, 3)  # rows: 2 slots + scratch; kernel 4 keeps 3 inputs


@pytest.mark.parametrize("first", [1, 2, 5])
def test_prefill_chunks_and_decodes_equal_whole_sequence(first):
    """A first chunk shorter than the kernel too: the state must hold the inputs of both steps."""
    torch.manual_seed(first)
    model = ConvOnly().eval()
    gm, cm, _ = _cached(model)
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    other = [7, 7, 2]
    # Prefills first, then one-token rows (a one-token first chunk travels with the decodes).
    steps = [sorted([(0, seq[:first], 0), (1, other, 0)], key=lambda r: len(r[1]) == 1),
             [(0, seq[first:7], first), (1, [8], 3)], [(1, [9], 4), (0, [2], 7)]]
    outs = run_steps(gm, cm, steps)
    seen = {0: [], 1: []}
    for step, out in zip(steps, outs):
        off = 0
        for sid, toks, _ in step:
            seen[sid] += toks
            with torch.no_grad():
                ref = model(torch.tensor([seen[sid]]), torch.arange(len(seen[sid]))[None])[0, -len(toks):]
            torch.testing.assert_close(out[0, off : off + len(toks)], ref, rtol=1e-5, atol=1e-5)
            off += len(toks)


def test_needs_cm():
    with pytest.raises(CompileError, match="CachedSequenceInterface"):
        InferenceOptimizer(None, {"insert_cached_causal_conv": {}})(mod=export_tiny(ConvOnly()))
