"""Piecewise CUDA graphs: the split at cache ops, the token-dim probes, padded replays against the eager graph.

On a CPU the graphs are emulated (a replay reruns the captured function and writes into its first outputs, as a
CUDA graph writes into its fixed addresses); the gpu-marked test captures real CUDA graphs.
"""

import copy
import operator
import sys
from pathlib import Path

import pytest
import torch
from ad_runtime.compile.piecewise import PiecewiseGraphs, default_piecewise_num_tokens, emulated_capturer
from ad_runtime.compile.piecewise_split import STATIC, TOKEN_INT, VARIES, classify, eager_nodes, split_at_eager_nodes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "transform"))
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, greedy_reference, tiny_llama  # noqa: E402

PROMPTS = [[3, 14, 15, 9, 2, 6, 11, 12, 40, 41, 42], [1, 7, 33], [42], [5, 5, 5, 5, 8, 9]]


@pytest.fixture(scope="module")
def cpu_llama():
    model = tiny_llama()
    return model, export_with_attention_ops(model)


def test_classify_tells_token_dims_from_other_changes():
    assert classify(torch.Size([1, 6, 4]), torch.Size([1, 9, 4]), 6, 9) == 1
    assert classify(torch.Size([1, 6]), torch.Size([1, 6]), 6, 9) == STATIC
    assert classify(torch.Size([1, 1, 4]), torch.Size([1, 2, 4]), 6, 9) == VARIES  # grows with the sequences
    assert classify(torch.Size([6, 6]), torch.Size([9, 9]), 6, 9) == VARIES  # two dims change: no padding rule
    assert classify(6, 9, 6, 9) == TOKEN_INT and classify(2, 3, 6, 9) == VARIES and classify(4, 4, 6, 9) == STATIC


def test_split_puts_every_cache_op_in_an_eager_piece(cpu_llama):
    _, gm = cpu_llama
    mod, _, _ = build_cached(copy.deepcopy(gm))
    attention = [n for n in mod.graph.nodes if "cached_attention" in str(n.target)]
    eager_set = eager_nodes(mod)
    assert len(attention) == 2 and set(attention) <= eager_set
    # tuple items stay with their producer: only items of eager nodes are eager
    assert all(n.args[0] in eager_set for n in eager_set if n.target is operator.getitem)
    split, eager = split_at_eager_nodes(mod)
    pieces = [n.target for n in split.graph.nodes if n.op == "call_module"]
    # guards + sizes, layer 0's projections, attention 0, layer 0's MLP + layer 1's projections, attention 1, the rest
    assert len(pieces) == 6 and len(eager) == 3
    for name in eager:
        assert any(a in str(n.target) for n in getattr(split, name).graph.nodes for a in ("cached_attention", "sym"))


class _ItemsAroundAReader(torch.nn.Module):
    """A tuple whose two items a step-input reader separates (as a hoisted logits gather can)."""

    def forward(self, input_ids, last_token_idx):
        parts = torch.split(input_ids, 2, -1)
        first = parts[0]
        picked = torch.index_select(first, 1, last_token_idx)
        return picked, parts[1] * 2


def test_tuple_items_stay_in_their_producers_piece():
    gm = torch.fx.symbolic_trace(_ItemsAroundAReader())
    split, eager = split_at_eager_nodes(gm)
    pieces = {n.target: getattr(split, n.target) for n in split.graph.nodes if n.op == "call_module"}
    producer = next(m for m in pieces.values() if any(n.target is torch.split for n in m.graph.nodes))
    assert sum(n.target is operator.getitem for n in producer.graph.nodes) == 2
    assert len(eager) == 1 and "index_select" in str(pieces[next(iter(eager))].code)
    x, idx = torch.randn(1, 5, 4), torch.tensor([4])
    for got, want in zip(split(x, idx), _ItemsAroundAReader()(x, idx)):
        torch.testing.assert_close(got, want)


def _run_both(pw, ref, cm, prompts, steps, chunk=None):
    got, got_samples = greedy_cached(pw, cm, prompts, steps, chunk)
    want, want_samples = greedy_cached(ref, cm, prompts, steps, chunk)
    return got, want, got_samples, want_samples


def test_padded_replays_give_the_eager_graphs_tokens_and_logits(cpu_llama):
    model, gm = cpu_llama
    mod, cm, _ = build_cached(copy.deepcopy(gm), max_batch_size=4, max_seq_len=48)
    pw = PiecewiseGraphs(mod, cm, [8, 16, 32], fallback=mod, capturer=emulated_capturer)
    assert pw.num_tokens == [8, 16, 32] and pw.num_pieces_captured == 3
    # Chunks of 5: steps mix chunked prefills with decodes, token counts 5..18 pad up to 8, 16 or 32.
    got, want, got_samples, want_samples = _run_both(pw, mod, cm, PROMPTS, steps=4, chunk=5)
    assert got == want == greedy_reference(model, PROMPTS, steps=4)
    for (_, _, a), (_, _, b) in zip(got_samples, want_samples):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert pw.num_replays >= 2  # the prefill and mixed steps; decode-only steps went to the fallback


def test_steps_past_the_largest_bucket_and_decode_steps_use_the_fallback(cpu_llama):
    _, gm = cpu_llama
    mod, cm, _ = build_cached(copy.deepcopy(gm), max_batch_size=4, max_seq_len=48)
    pw = PiecewiseGraphs(mod, cm, [8], fallback=mod, capturer=emulated_capturer)
    got, want, _, _ = _run_both(pw, mod, cm, [PROMPTS[0], PROMPTS[3]], steps=3)  # one 17-token prefill step
    assert got == want and pw.num_replays == 0
    got, want, _, _ = _run_both(pw, mod, cm, [PROMPTS[1], PROMPTS[2]], steps=3)  # 4 tokens: bucket 8
    assert got == want and pw.num_replays == 1


def test_sizes_are_clipped_to_the_step_limits(cpu_llama):
    _, gm = cpu_llama
    mod, cm, _ = build_cached(copy.deepcopy(gm), max_batch_size=4, max_seq_len=24)
    assert default_piecewise_num_tokens(cm) == [16]  # max_num_tokens defaults to max_batch_size * max_seq_len
    pw = PiecewiseGraphs(mod, cm, [1, 16, 64], fallback=mod, capturer=emulated_capturer)
    assert pw.num_tokens == [16]
    off = PiecewiseGraphs(mod, cm, [], fallback=mod, capturer=emulated_capturer)
    assert off.num_pieces_captured == 0 and not off.covers(4)


def test_a_piece_that_cannot_be_captured_turns_the_graphs_off_with_a_warning(cpu_llama, caplog):
    _, gm = cpu_llama
    mod, cm, _ = build_cached(copy.deepcopy(gm), max_batch_size=4, max_seq_len=48)

    def refusing(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level("WARNING"):
        pw = PiecewiseGraphs(mod, cm, [8, 16], fallback=mod, capturer=refusing)
    assert "piecewise CUDA graphs off" in caplog.text and "not permitted" in caplog.text
    assert pw.num_pieces_captured == 0 and not pw.covers(4)
    got, want, _, _ = _run_both(pw, mod, cm, PROMPTS, steps=3)
    assert got == want and pw.num_replays == 0


def test_one_sequence_engines_probe_with_one_sequence(cpu_llama):
    model, gm = cpu_llama
    mod, cm, _ = build_cached(copy.deepcopy(gm), max_batch_size=1, max_seq_len=48)
    pw = PiecewiseGraphs(mod, cm, [16, 32], fallback=mod, capturer=emulated_capturer)
    assert pw.num_pieces_captured == 3
    got, want, _, _ = _run_both(pw, mod, cm, [PROMPTS[0]], steps=3)
    assert got == want == greedy_reference(model, [PROMPTS[0]], steps=3) and pw.num_replays == 1
    tiny, tiny_cm, _ = build_cached(copy.deepcopy(gm), max_batch_size=1, max_seq_len=8)
    assert PiecewiseGraphs(tiny, tiny_cm, [8], fallback=tiny, capturer=emulated_capturer).num_tokens == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_piecewise_graphs_match_eager(backend):
    model = tiny_llama(dtype=torch.float16, device="cuda")
    gm = export_with_attention_ops(model)
    ref, ref_cm, _ = build_cached(copy.deepcopy(gm), device="cuda", backend=backend)
    mod, cm, _ = build_cached(copy.deepcopy(gm), device="cuda", backend=backend,
                              compile_model={"backend": "torch-cudagraph", "piecewise_num_tokens": [8, 16, 32]})
    pw = mod.model
    assert isinstance(pw, PiecewiseGraphs) and pw.num_pieces_captured == 3
    # under no_grad, as greedy_cached runs (the buffers made under inference_mode still take the step's inputs)
    got, got_samples = greedy_cached(mod, cm, PROMPTS, steps=4, chunk=5)
    want, want_samples = greedy_cached(ref, ref_cm, PROMPTS, steps=4, chunk=5)
    assert got == want
    for (_, _, a), (_, _, b) in zip(got_samples, want_samples):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert pw.num_replays >= 2
