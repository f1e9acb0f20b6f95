"""Checkpoint keys of per-expert MoE layouts (Mixtral `block_sparse_moe.experts.N.w1`) to stacked model keys."""

import re

import torch

from ..errors import CompileError

# Gated experts: gate (w1/gate_proj) and up (w3/up_proj) rows stack into gate_up_proj [E, 2I, H], down (w2) into
# down_proj [E, H, I]. Ungated experts (NemotronH: up, activation, down) stack up into up_proj [E, I, H].
_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<idx>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_RENAMES = (("block_sparse_moe", "mlp"),)


def _rename(key: str, expected: set[str]) -> str:
    for old, new in _RENAMES:
        cand = key.replace(f".{old}.", f".{new}.")
        if cand != key and cand in expected:
            return cand
    return key


def _rename_prefix(prefix: str, expected: set[str]) -> str:
    for old, new in _RENAMES:
        cand = (prefix + ".").replace(f".{old}.", f".{new}.")[:-1]
        if cand != prefix and f"{cand}.experts.gate_up_proj" in expected:
            return cand
    return prefix


class ExpertStacker:
    """Collect per-expert tensors across checkpoint files; emit a layer's stacked tensors once it is complete."""

    def __init__(self, expected: set[str], num_experts: int | None):
        self.expected = expected
        self.num_experts = num_experts
        self.pending: dict[str, dict[str, dict[int, torch.Tensor]]] = {}

    def convert(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            m = _EXPERT.match(key)
            stacked_prefix = _rename_prefix(m["prefix"], self.expected) if m else ""
            gated = f"{stacked_prefix}.experts.gate_up_proj" in self.expected
            ungated = f"{stacked_prefix}.experts.up_proj" in self.expected
            if m is None or not (gated or ungated):
                out[_rename(key, self.expected)] = value
                continue
            fresh = {"gate": {}, "up": {}, "down": {}} if gated else {"up": {}, "down": {}}
            roles = self.pending.setdefault(stacked_prefix, fresh)
            role = _ROLE[m["proj"]]
            if role not in roles:
                raise CompileError(
                    f"checkpoint key {key!r}: the model's experts at {stacked_prefix} have no {role} projection"
                )
            roles[role][int(m["idx"])] = value
            out.update(self._complete(stacked_prefix))
        return out

    def _complete(self, prefix: str) -> dict[str, torch.Tensor]:
        roles = self.pending[prefix]
        n = self.num_experts
        if n is None or any(len(roles[r]) < n for r in roles):
            return {}
        del self.pending[prefix]
        down = torch.stack([roles["down"][e] for e in range(n)])
        if "gate" not in roles:
            return {f"{prefix}.experts.up_proj": torch.stack([roles["up"][e] for e in range(n)]),
                    f"{prefix}.experts.down_proj": down}
        gate_up = torch.stack([torch.cat([roles["gate"][e], roles["up"][e]], dim=0) for e in range(n)])
        return {f"{prefix}.experts.gate_up_proj": gate_up, f"{prefix}.experts.down_proj": down}

    def leftover(self) -> list[str]:
        return sorted(self.pending)
