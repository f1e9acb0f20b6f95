"""Point device constants baked into an exported graph (the trace ran on meta) at the real device."""

import torch
from torch.fx import GraphModule


def _retarget(value: object, device: torch.device) -> tuple[object, bool]:
    if isinstance(value, torch.device) and value != device:
        return device, True
    if isinstance(value, (list, tuple)):
        items = [_retarget(v, device) for v in value]
        if any(changed for _, changed in items):
            return type(value)(v for v, _ in items), True
    return value, False


def retarget_device_constants(gm: GraphModule, device: str | torch.device) -> int:
    """Rewrite every torch.device argument (e.g. `aten.to.device(x, meta)` from `.to(x.device)`) to `device`.

    Left alone, a CPU tensor moved "to meta" turns into garbage without an error. Returns the nodes changed.
    """
    device = torch.device(device)
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args, a_changed = _retarget(tuple(node.args), device)
        kwargs = dict(node.kwargs)
        k_changed = False
        for k, v in kwargs.items():
            kwargs[k], c = _retarget(v, device)
            k_changed |= c
        if a_changed or k_changed:
            node.args, node.kwargs = args, kwargs  # type: ignore[assignment]
            changed += 1
    if changed:
        gm.recompile()
    return changed


def move_tensors(gm: GraphModule, device: str | torch.device) -> int:
    """Move buffers and plain tensor attributes (lifted constants) not yet on `device`; returns how many."""
    device = torch.device(device)
    moved = 0
    for mod in gm.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device and buf.device.type != "meta":
                mod._buffers[name] = buf.to(device)
                moved += 1
        for name, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                if value.device != device and value.device.type != "meta":
                    setattr(mod, name, value.to(device))
                    moved += 1
    return moved
