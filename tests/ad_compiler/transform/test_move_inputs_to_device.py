"""move_inputs_to_device: device constants baked in at trace time and stray tensors follow the target device."""

import torch
from torch.fx import Graph, GraphModule

aten = torch.ops.aten


def _traced_on_meta() -> GraphModule:
    """What export leaves for HF rotary code traced on meta: `aten.to.device(inv_freq, meta, float32)`."""
    root = torch.nn.Module()
    root.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
    g = Graph()
    x = g.placeholder("x")
    scale = g.get_attr("scale")
    moved = g.call_function(aten.to.device, (scale, torch.device("meta"), torch.float32))
    g.output(g.call_function(aten.mul.Tensor, (x, moved)))
    return GraphModule(root, g)


def _has_meta(gm: GraphModule) -> bool:
    return any(torch.device("meta") in n.args for n in gm.graph.nodes if n.op == "call_function")


def test_retargets_meta_device_constants(apply_transform):
    gm = _traced_on_meta()
    assert _has_meta(gm)
    gm, info = apply_transform("move_inputs_to_device", gm, device="cpu")
    assert info.num_matches == 1
    assert not _has_meta(gm)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), x * 2)
    _, again = apply_transform("move_inputs_to_device", gm, device="cpu")
    assert again.num_matches == 0  # idempotent


def test_moves_buffers(apply_transform):
    gm = _traced_on_meta()
    gm.scale = torch.full((4,), 3.0, device="meta")
    gm, info = apply_transform("move_inputs_to_device", gm, device="cpu")
    assert gm.scale.device.type == "meta"  # meta buffers have no value to move: left to load_weights' check
    gm.scale = torch.full((4,), 3.0, dtype=torch.float64)
    # Only device moves count; a CPU buffer on a CPU target stays put.
    _, info = apply_transform("move_inputs_to_device", gm, device="cpu")
    assert info.num_matches == 0
