"""Small sampled batches as one captured graph: sample_rows draws what the sampler's torch path draws (CPU), and on
a GPU the captured graph does, takes new parameters, and is used only for plain, unseeded, all-sampling batches."""

import pytest
import torch
from ad_runtime.executor import flashinfer_sampling
from types import SimpleNamespace

from ad_runtime.executor.graph_sampling import MAX_ROWS, GraphSampling, sample_rows
from ad_runtime.executor.sampler import Sampler
from ad_runtime.sampling_params import SamplingParams

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
N = 6000


def _expected(probs: torch.Tensor, top_k: int | None, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """The sampler's distribution: temperature, top-k (ties stay), renormalise, the nucleus, renormalise."""
    p = torch.softmax(torch.log(probs) / temperature, -1)
    if top_k:
        p = torch.where(p < p.topk(top_k).values[-1], 0.0, p)
        p = p / p.sum()
    vals, idx = torch.sort(p, descending=True)
    keep = torch.cumsum(vals, 0) - vals < top_p
    out = torch.zeros_like(p)
    out[idx[keep]] = vals[keep]
    return out / out.sum()


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.bincount(tokens.cpu(), minlength=vocab).float()
    return counts / counts.sum()


@pytest.mark.parametrize("top_k, top_p, temperature", [(None, 1.0, 1.0), (None, 0.7, 1.0), (3, 0.9, 1.0),
                                                       (2, 1.0, 0.5), (None, 0.8, 2.0)])
def test_sample_rows_draws_the_samplers_distribution(top_k, top_p, temperature):
    torch.manual_seed(0)
    logits = torch.log(PROBS).expand(N, -1)
    vocab = PROBS.numel()
    tokens = sample_rows(logits, torch.full((N,), temperature), torch.full((N,), top_k or vocab),
                         torch.full((N,), top_p))
    expected = _expected(PROBS, top_k, top_p, temperature)
    assert torch.allclose(_frequencies(tokens, vocab), expected, atol=0.02)
    assert set(tokens.tolist()) <= set(torch.nonzero(expected).flatten().tolist())  # nothing outside the cuts


def test_sample_rows_without_cuts_draws_the_softmax():
    torch.manual_seed(0)
    logits = torch.log(PROBS).expand(N, -1)
    tokens = sample_rows(logits, torch.full((N,), 0.7), torch.zeros(N, dtype=torch.long), torch.zeros(N), cut=False)
    assert torch.allclose(_frequencies(tokens, PROBS.numel()), _expected(PROBS, None, 1.0, 0.7), atol=0.02)


def test_sample_rows_keeps_each_rows_parameters():
    torch.manual_seed(0)
    logits = torch.log(PROBS).expand(3, -1).contiguous()
    # row 0: top-k 1 (its argmax); row 1: a nucleus of the first two; row 2: everything
    t = sample_rows(logits.repeat(2000, 1), torch.ones(6000), torch.tensor([1, 6, 6] * 2000),
                    torch.tensor([1.0, 0.6, 1.0] * 2000)).view(2000, 3)
    assert set(t[:, 0].tolist()) == {0}
    assert set(t[:, 1].tolist()) == {0, 1}
    assert set(t[:, 2].tolist()) == set(range(6))


def test_not_used_on_a_cpu():
    assert not GraphSampling(torch.device("cpu")).applies(torch.zeros(2, 8))


def test_draw_pads_rows_to_a_bucket_and_copies_parameters_when_they_change(monkeypatch):
    g, captured, replays = GraphSampling(torch.device("cpu")), [], []

    def capture(key):  # stands in for the CUDA graph: its buffers, a replay that is counted
        bucket, vocab, dtype, _ = key
        captured.append(key)
        g._graphs[key] = (SimpleNamespace(replay=lambda: replays.append(key)), torch.zeros(bucket, vocab, dtype=dtype),
                          torch.zeros(3 * bucket), torch.arange(bucket))
        return g._graphs[key]

    monkeypatch.setattr(g, "_capture", capture)
    logits = torch.randn(3, 10)
    tokens = g.draw(logits, [0.5, 0.7, 0.9], [10, 4, 10], [1.0, 1.0, 0.8])
    (key,) = captured
    assert key == (4, 10, torch.float32, True) and tokens.tolist() == [0, 1, 2]
    _, static_logits, static_params, _ = g._graphs[key]
    assert torch.equal(static_logits[:3], logits)
    # the padded fourth row: temperature 1, top-k 1, top-p 1
    expected = torch.tensor([0.5, 0.7, 0.9, 1.0, 10, 4, 10, 1, 1.0, 1.0, 0.8, 1.0])
    assert torch.equal(static_params, expected)
    static_params.fill_(-1)  # the same parameters again: not copied
    g.draw(logits, [0.5, 0.7, 0.9], [10, 4, 10], [1.0, 1.0, 0.8])
    assert static_params.eq(-1).all()
    g.draw(logits, [0.6, 0.7, 0.9], [10, 4, 10], [1.0, 1.0, 0.8])
    assert static_params[0].item() == pytest.approx(0.6)
    g.draw(torch.randn(5, 10), [1.0] * 5, [10] * 5, [1.0] * 5)  # 5 rows, no cut: another graph (8 rows)
    assert captured[1] == (8, 10, torch.float32, False) and len(replays) == 4


def test_a_graph_that_fails_turns_graphs_off_and_the_batch_samples_without_them(monkeypatch, caplog):
    s = Sampler("cpu")
    monkeypatch.setattr(s.graphs, "enabled", True)
    monkeypatch.setattr(s.graphs, "applies", lambda logits: s.graphs.enabled)

    def capture(key):
        raise RuntimeError("CUDA out of memory\nmore detail")

    monkeypatch.setattr(s.graphs, "_capture", capture)
    logits = torch.log(PROBS).expand(4, -1)
    tokens = s.sample(logits, [SamplingParams(temperature=0.8, top_p=0.3)] * 4, [0, 1, 2, 3]).tokens
    assert tokens.tolist() == [0, 0, 0, 0]  # the nucleus of 0.3 is token 0 alone, drawn by the torch path
    assert not s.graphs.enabled and "sampling graphs are off" in caplog.text and "more detail" not in caplog.text


def test_flashinfer_draws_top_p_batches_the_graph_the_rest(monkeypatch):
    s = Sampler("cpu")
    used = []
    monkeypatch.setattr(s.graphs, "applies", lambda logits: True)
    monkeypatch.setattr(s.graphs, "draw", lambda logits, t, k, p: used.append(("graph", k, p)) or torch.zeros(2))
    monkeypatch.setattr(flashinfer_sampling, "can_draw", lambda logits, cut_p, seeded: cut_p and not seeded)
    monkeypatch.setattr(flashinfer_sampling, "draw", lambda *a: used.append(("flashinfer",)) or torch.zeros(2))
    logits = torch.randn(2, 10)
    s.sample(logits, [SamplingParams(temperature=0.8, top_p=0.9)] * 2, [0, 1])
    s.sample(logits, [SamplingParams(temperature=0.8, top_k=3)] * 2, [2, 3])
    assert used == [("flashinfer",), ("graph", [3, 3], [1.0, 1.0])]


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.gpu
def test_captured_graph_draws_the_distribution_and_takes_new_parameters():
    _cuda_or_skip()
    g = GraphSampling(torch.device("cuda"))
    vocab = PROBS.numel()
    logits = torch.log(PROBS).to(torch.bfloat16).cuda().expand(MAX_ROWS, -1).contiguous()
    draws = []
    for _ in range(N // MAX_ROWS):
        draws.append(g.draw(logits, [1.0] * MAX_ROWS, [vocab] * MAX_ROWS, [0.7] * MAX_ROWS).clone())
    freq = _frequencies(torch.cat(draws), vocab)
    assert torch.allclose(freq, _expected(torch.softmax(logits[0].float().cpu(), -1), None, 0.7), atol=0.03)
    # new parameters reach the captured graph: a nucleus of one token, then top-k 2
    assert set(g.draw(logits, [1.0] * MAX_ROWS, [vocab] * MAX_ROWS, [0.01] * MAX_ROWS).tolist()) == {0}
    assert set(g.draw(logits, [1.0] * MAX_ROWS, [2] * MAX_ROWS, [1.0] * MAX_ROWS).tolist()) <= {0, 1}
    assert len(g._graphs) == 1 and g.num_replays == N // MAX_ROWS + 2
    # temperature alone: its own graph, without the sort
    draws = torch.cat([g.draw(logits, [0.5] * MAX_ROWS, [vocab] * MAX_ROWS, [1.0] * MAX_ROWS).clone()
                       for _ in range(N // MAX_ROWS)])
    expected = _expected(torch.softmax(logits[0].float().cpu(), -1), None, 1.0, 0.5)
    assert torch.allclose(_frequencies(draws, vocab), expected, atol=0.03) and len(g._graphs) == 2
    # three rows take the four-row graph; each row keeps its own parameters
    three = g.draw(logits[:3], [1.0] * 3, [1, vocab, vocab], [1.0, 0.01, 1.0])
    assert three.shape == (3,) and three[:2].tolist() == [0, 0] and len(g._graphs) == 3


@pytest.mark.gpu
def test_sampler_takes_the_graph_only_for_plain_unseeded_sampling_batches(monkeypatch):
    _cuda_or_skip()
    s = Sampler("cuda")
    monkeypatch.setattr(flashinfer_sampling, "can_draw", lambda *a: False)  # loaded or not: top-p through the graph
    logits = torch.randn(4, 1000, device="cuda")
    s.sample(logits, [SamplingParams(temperature=0.8, top_p=0.9)] * 4, [0, 1, 2, 3])
    assert s.graphs.num_replays == 1
    s.sample(logits, [SamplingParams(temperature=0.8, top_p=0.9, seed=1)] * 4, [4, 5, 6, 7])  # seeded
    s.sample(logits, [SamplingParams(temperature=0.8)] * 3 + [SamplingParams(temperature=0.0)], [8, 9, 10, 11])
    s.sample(logits, [SamplingParams(temperature=0.8, logprobs=1)] * 4, [12, 13, 14, 15])
    s.sample(torch.randn(MAX_ROWS + 1, 1000, device="cuda"), [SamplingParams(temperature=0.8)] * (MAX_ROWS + 1),
             list(range(16, 17 + MAX_ROWS)))
    assert s.graphs.num_replays == 1
