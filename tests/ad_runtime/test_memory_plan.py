"""memory_plan: the activation peak of a step, read off the exported graph's example values and scaled to its tokens."""

import pytest
import torch
import torch.nn as nn
from ad_runtime.memory_plan import activation_peak_bytes
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 8, bias=False)
        self.down = nn.Linear(8, 4, bias=False)
        self.register_buffer("table", torch.ones(5, 3))  # traced as a constant: not an activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.up(x)  # [B, S, 8]
        b = torch.relu(a)  # a and b alive together
        c = b.view(-1, 8)  # a view: b's bytes, kept alive until `down` reads it
        return self.down(c) + self.table.sum()  # the logits: [B*S, 4]


def _traced() -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(_Mlp())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        FakeTensorProp(gm, mode).propagate(mode.from_tensor(torch.randn(2, 4, 16)))  # example: 2 x 4 tokens
    return gm


def test_peak_scales_with_tokens_and_counts_logits_rows() -> None:
    gm = _traced()
    # While relu runs, `up`'s output and relu's are both alive: 2 x 8 float32 a token, the peak of a long step.
    assert activation_peak_bytes(gm, tokens=100, logit_rows=3) == 2 * 8 * 4 * 100
    assert activation_peak_bytes(gm, tokens=1000, logit_rows=3) == 2 * 8 * 4 * 1000
    # One token, 1000 logit rows: at the final add, `down`'s one row (16 B) and the 1000-row output are alive.
    assert activation_peak_bytes(gm, tokens=1, logit_rows=1000) == 16 + 1000 * 16


def test_a_graph_without_example_values_is_refused() -> None:
    gm = torch.fx.symbolic_trace(_Mlp())
    with pytest.raises(ValueError, match="example value"):
        activation_peak_bytes(gm, tokens=10, logit_rows=1)


def _cm(device: str, max_num_pages: int | None = None):
    from types import SimpleNamespace

    return SimpleNamespace(device=torch.device(device), num_pages=10, page_size=16, max_num_pages=max_num_pages,
                           state_bytes=lambda: 1024)


def test_kv_pages_on_a_gpu_are_what_resize_kv_cache_will_allocate() -> None:
    from ad_config import LlmArgs
    from ad_runtime.memory_plan import _kv_pages

    args = LlmArgs(model="m", free_mem_ratio=0.5)
    per_token, gib = 1000, 1024**3
    # Half of what the weights, activations and state caches leave, in pages of 16 tokens, less the scratch page.
    expected = int(0.5 * (10 * gib - 2 * gib - 1024)) // (per_token * 16) - 1
    assert _kv_pages(_cm("cuda"), args, per_token, available=10 * gib, weights=gib, activations=gib) == expected
    assert _kv_pages(_cm("cuda", max_num_pages=50), args, per_token, available=10 * gib, weights=gib,
                     activations=gib) == 50
    # A CPU keeps the configured pages where they fit; so does a GPU build with resize_kv_cache switched off.
    assert _kv_pages(_cm("cpu"), args, per_token, available=10 * gib, weights=gib, activations=gib) == 10
    off = LlmArgs(model="m", transforms={"resize_kv_cache": {"enabled": False}})
    assert _kv_pages(_cm("cuda"), off, per_token, available=10 * gib, weights=gib, activations=gib) == 10


def test_kv_pages_on_a_cpu_short_of_memory_are_what_initialize_cache_fits() -> None:
    from ad_config import LlmArgs
    from ad_runtime.memory_plan import _kv_pages

    # 16,000-byte pages; 1 GiB + 800,000 bytes free, 1 GiB of it for the weights: half of the rest is 25 pages,
    # one of them the scratch page (the activations are not allocated yet when the cache is)
    pages = _kv_pages(_cm("cpu"), LlmArgs(model="m"), 1000, available=1024**3 + 800_000, weights=1024**3,
                      activations=10**9)
    assert pages == 10  # the ten configured fit
    cm = _cm("cpu")
    cm.num_pages = 100
    assert _kv_pages(cm, LlmArgs(model="m"), 1000, available=1024**3 + 800_000, weights=1024**3,
                     activations=10**9) == 24
