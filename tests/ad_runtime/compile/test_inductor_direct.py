"""InductorCompiled: Inductor on an FX graph without Dynamo; shape guards, variants, static inputs, disk caches."""

import pytest
import torch
import torch.nn as nn
from ad_runtime.compile.inductor_direct import InductorCompiled

pytestmark = pytest.mark.slow  # each case runs Inductor's C++ codegen on the CPU (seconds)


class _Step(nn.Module):
    """A miniature step: tokens [1, T, H] through a linear, plus a row gathered from a fixed-size cache."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        # functions only (no submodule calls, no tensor methods): the graph AOTAutograd's cache accepts
        return torch.relu(torch.nn.functional.linear(x, self.weight)) + torch.sum(torch.index_select(cache, 0, rows), 0)


def _graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(_Step().eval())


def _inputs(tokens: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens * 31 + rows)
    return {"x": torch.randn(1, tokens, 8, generator=g), "rows": torch.arange(rows) % 5,
            "cache": torch.randn(5, 8, generator=g)}


def test_one_compile_serves_many_shapes_and_a_second_one_loads_from_disk():
    from torch._dynamo.utils import counters

    gm = _graph()
    mod = InductorCompiled(gm, static_inputs={"cache"})
    counters.clear()
    with torch.no_grad():
        for tokens, rows in ((6, 3), (9, 2), (17, 4), (2, 2)):
            kw = _inputs(tokens, rows)
            torch.testing.assert_close(mod(**kw), gm(**kw))
    assert mod.num_compiles == 1
    # (a miss, or a hit left by an earlier run of this test: the disk caches are the machine's own)
    assert counters["aot_autograd"]["autograd_cache_miss"] + counters["aot_autograd"]["autograd_cache_hit"] == 1
    guards = mod.variants[0].guard_source or ""
    assert "L['t2']" not in guards  # the static input (the cache) is not guarded: its shape never changes

    # Another process, or another engine, compiling the same graph: AOTAutograd's and Inductor's disk caches hit
    # (what makes a warm build skip tracing and code generation).
    counters.clear()
    second = InductorCompiled(_graph(), static_inputs={"cache"})
    with torch.no_grad():
        torch.testing.assert_close(second(**_inputs(6, 3)), gm(**_inputs(6, 3)))
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1, dict(counters["aot_autograd"])
    assert counters["inductor"]["fxgraph_cache_hit"] == 1, dict(counters["inductor"])


def test_a_step_outside_the_guards_compiles_a_variant():
    gm = _graph()
    mod = InductorCompiled(gm, static_inputs={"cache"})
    with torch.no_grad():
        for tokens, rows in ((6, 3), (1, 1), (5, 2), (1, 1)):
            kw = _inputs(tokens, rows)
            torch.testing.assert_close(mod(**kw), gm(**kw))
    # rows of one are assumed away by aten's decompositions only if they say so; either way every result is
    # right, and no step shape compiles more than once.
    assert 1 <= mod.num_compiles <= 2
    assert mod.num_compiles == len(mod.variants)
