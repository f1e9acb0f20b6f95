"""Penalties, bias, min_tokens and logprobs on a GPU: the same picks and values as on the CPU, with overlap too."""

import pytest
import torch
from ad_runtime.executor.sampler import Sampler
from ad_runtime.sampling_params import SamplingParams

from test_overlap import VOCAB, FuturePagedRunner, _clean, _engine, _prompts, _run

pytestmark = pytest.mark.gpu

PARAMS = [
    SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=3),
    SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.7, logprobs=0),
    SamplingParams(max_tokens=8, temperature=0.0, logit_bias={7: 3.0, 8: -100.0}, logprobs=2),
    SamplingParams(max_tokens=12, temperature=0.0, min_tokens=6, logit_bias={5: 50.0}),
]


class CudaRunner(FuturePagedRunner):
    """The CPU fake model's logits, handed back on the GPU (so sampling, counts and logprobs run there)."""

    def __init__(self, num_pages: int, page_size: int):
        super().__init__(num_pages, page_size)
        self.device = torch.device("cuda")

    def forward(self, batch, num_prefill, future=None):
        return super().forward(batch, num_prefill, None if future is None else future.cpu()).cuda()


def test_sampler_on_gpu_equals_cpu():
    torch.manual_seed(0)
    logits = torch.randn(len(PARAMS), VOCAB)
    picks = {}
    for device in ("cpu", "cuda"):
        s = Sampler(device, eos_token_ids=[5])
        out = []
        for _ in range(6):
            o = s.sample(logits.to(device), PARAMS, list(range(len(PARAMS))), [[1, 2, 3]] * len(PARAMS))
            tokens = o.tokens.cpu().tolist()
            out.append((tokens, o.logprobs.to_host().by_row(tokens)))
        picks[device] = out
    for (t_cpu, lp_cpu), (t_gpu, lp_gpu) in zip(picks["cpu"], picks["cuda"]):
        assert t_cpu == t_gpu
        assert lp_cpu.keys() == lp_gpu.keys()
        for row in lp_cpu:
            assert list(lp_cpu[row]) == list(lp_gpu[row])
            assert all(abs(lp_cpu[row][t] - lp_gpu[row][t]) < 1e-5 for t in lp_cpu[row])


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_on_gpu_equals_cpu(overlap):
    prompts = _prompts(12, seed=5)
    params = PARAMS * 3
    kw = dict(num_pages=14, page=4, bs=4, tokens=64, eos=(5,))
    cpu = _run(_engine(False, **kw), prompts, params)
    eng = _engine(overlap, **kw)
    eng.runner = CudaRunner(14, 4)
    eng.sampler = type(eng.sampler)(torch.device("cuda"), [5])
    eng._host_tokens = type(eng._host_tokens)(4, torch.device("cuda"))
    gpu = _run(eng, prompts, params)
    for a, b in zip(cpu, gpu):
        assert (a.output_token_ids, a.finish_reason) == (b.output_token_ids, b.finish_reason)
        assert (a.logprobs is None) == (b.logprobs is None)
        for da, db in zip(a.logprobs or [], b.logprobs or []):
            assert list(da) == list(db) and all(abs(da[t] - db[t]) < 1e-5 for t in da)
    _clean(eng)
