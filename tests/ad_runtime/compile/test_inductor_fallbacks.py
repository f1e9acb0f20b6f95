"""inductor_fallbacks: the graph's custom ops get Inductor's fallback before compiling, not an implicit one."""

import torch
import torch._inductor.config
import torch._inductor.exc as inductor_exc
from ad_runtime.compile.inductor_fallbacks import register_custom_op_fallbacks
from torch._inductor.lowering import lowerings


@torch.library.custom_op("auto_deploy::_test_fallback_probe", mutates_args=())
def _probe(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2 + y, x + y


@_probe.register_fake
def _probe_fake(x, y):
    return torch.empty_like(x), torch.empty_like(x)


def _chain(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Both outputs of each call reach the next one: the shape that made Inductor's implicit-fallback message
    # double per call. Only extern and fallback kernels: nothing for Inductor to compile in C++ (a fast test).
    for _ in range(3):
        x, res = torch.ops.auto_deploy._test_fallback_probe(torch.mm(x, x), res)
    return x, res


def test_registered_before_compile_and_no_implicit_fallback(monkeypatch):
    probe = torch.ops.auto_deploy._test_fallback_probe.default
    gm = torch.fx.symbolic_trace(_chain)
    gm.graph.call_function(probe, (gm.graph.find_nodes(op="placeholder")[0],) * 2)  # an OpOverload node, unused
    assert probe not in lowerings
    assert register_custom_op_fallbacks(gm) == [probe]
    assert probe in lowerings and register_custom_op_fallbacks(gm) == []

    formatted = []
    monkeypatch.setattr(inductor_exc.OperatorIssue, "operator_str",
                        staticmethod(lambda *a: formatted.append(a) or "probe"))
    x, res = torch.randn(4, 4), torch.randn(4, 4)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would skip lowering altogether
        got = torch.compile(_chain)(x, res)
    torch.testing.assert_close(got, _chain(x, res))
    assert formatted == []  # no implicit fallback was made, so its message was never formatted
