"""insert_cached_ssm_attention: torch_ssm becomes torch_cached_ssm with per-sequence state; outputs unchanged."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op, placeholder_names
from ad_runtime.kv_cache.interface import CachedSequenceInterface
from cached_attention_models import TinyAttentionModel, export_tiny
from cached_ssm_models import TinyMambaModel, assert_steps_equal_whole_sequences, run_steps

import ad_runtime  # noqa: F401 - registers the runtime transforms

CACHED = {"insert_cached_ssm_attention": {}, "insert_cached_causal_conv": {}, "initialize_cache": {}}


def _cached(model: torch.nn.Module, max_batch_size: int = 3) -> tuple[torch.nn.Module, CachedSequenceInterface, dict]:
    gm = export_tiny(model)
    cm = CachedSequenceInterface(max_batch_size=max_batch_size, max_seq_len=32, page_size=4)
    opt = InferenceOptimizer(None, CACHED)
    return opt(cm=cm, mod=gm), cm, opt.history


def _ref(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0]


def test_replaces_ops_and_allocates_state():
    torch.manual_seed(0)
    model = TinyMambaModel(n_layers=2).eval()
    gm, cm, hist = _cached(model)
    assert hist["insert_cached_ssm_attention"].num_matches == 2
    assert count_op(gm, torch.ops.auto_deploy.torch_ssm) == 0
    assert count_op(gm, torch.ops.auto_deploy.torch_cached_ssm) == 2
    assert {"ssm_state_0", "ssm_state_1", "slot_idx", "slot_idx_host", "batch_info_host"} <= set(placeholder_names(gm))
    # One row per running sequence plus the scratch row; heads x head_dim x state size, float32.
    assert cm.caches["ssm_state_0"].shape == (4, 4, 4, 3) and cm.caches["ssm_state_0"].dtype == torch.float32


def test_mixed_steps_equal_whole_sequences():
    """Prefills of different lengths, a chunked prefill continuing from its state, then decodes: every
    output row equals the uncached model on the whole sequence so far."""
    torch.manual_seed(1)
    model = TinyMambaModel(n_layers=2, chunk_size=3).eval()
    gm, cm, _ = _cached(model)
    assert_steps_equal_whole_sequences(model, gm, cm)


def test_state_row_is_rewritten_when_a_slot_is_reused():
    torch.manual_seed(2)
    model = TinyMambaModel(n_layers=1).eval()
    gm, cm, _ = _cached(model, max_batch_size=1)
    run_steps(gm, cm, [[(0, [1, 2, 3, 4, 5], 0)], [(0, [6], 5)]])
    cm.pool.free(0)
    (out,) = run_steps(gm, cm, [[(0, [9, 8, 7], 0)]])  # a new sequence in the same slot starts from zeros
    torch.testing.assert_close(out[0], _ref(model, [9, 8, 7]), rtol=1e-4, atol=1e-5)
    cm.pool.free(0)
    (out,) = run_steps(gm, cm, [[(0, [4], 0)]])  # a one-token prompt runs with the decodes: still from zeros
    torch.testing.assert_close(out[0], _ref(model, [4]), rtol=1e-4, atol=1e-5)


def test_needs_cm_and_skips_graphs_without_ssm():
    gm = export_tiny(TinyMambaModel())
    with pytest.raises(CompileError, match="CachedSequenceInterface"):
        InferenceOptimizer(None, {"insert_cached_ssm_attention": {}})(mod=gm)
    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=16, page_size=4)
    opt = InferenceOptimizer(None, {"insert_cached_ssm_attention": {}})
    opt(cm=cm, mod=export_tiny(TinyAttentionModel()))
    assert opt.history["insert_cached_ssm_attention"].skipped and not cm.state_specs


def test_scheduled_sequence_without_slot_is_refused():
    from ad_runtime.kv_cache.interface import StepSequence

    gm, cm, _ = _cached(TinyMambaModel())
    cm.pool.ensure_capacity(0, 3)
    with pytest.raises(ValueError, match="slot"):
        cm.update([StepSequence([1, 2, 3], 0, cm.pool.page_table(0))])
