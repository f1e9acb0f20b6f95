"""Test helpers: a tiny random Llama exported to a torch_attention graph, and a cached greedy loop."""

import ad_runtime  # noqa: F401 - registers runtime transforms
import torch
import torch.nn as nn
from ad_compiler.export import torch_export_to_gm
from ad_compiler.transform.interface import TransformRegistry
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_runtime.kv_cache.interface import CachedSequenceInterface, StepSequence
from torch.export import Dim
from torch.fx import GraphModule
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


class LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def tiny_llama(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LogitsOnly(LlamaForCausalLM(cfg)).eval().to(device=device, dtype=dtype)


def export_with_attention_ops(model: nn.Module) -> GraphModule:
    """Export and rewrite SDPA into torch_attention (bsnd) with the compiler's matchers."""
    dev = next(model.parameters()).device
    ids = torch.randint(0, VOCAB, (2, 6), device=dev)
    pos = torch.arange(6, device=dev).expand(2, 6)
    dyn = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    gm = torch_export_to_gm(model, kwargs={"input_ids": ids, "position_ids": pos},
                            dynamic_shapes={"input_ids": dyn, "position_ids": dyn})
    names = ["match_repeat_kv", "match_eager_attention", "match_sdpa_to_torch_attention",
             "match_grouped_attention", "match_attention_layout"]
    return InferenceOptimizer(None, {n: {} for n in names if TransformRegistry.has(n)})(mod=gm)


def build_cached(gm: GraphModule, device: str = "cpu", backend: str = "torch", compile_backend: str | None = None,
                 max_batch_size: int = 4, max_seq_len: int = 48, page_size: int = 4, **extra: dict):
    """Run the cache_init (and optionally compile) transforms; returns (model, cm, history)."""
    cm = CachedSequenceInterface(max_batch_size=max_batch_size, max_seq_len=max_seq_len, page_size=page_size,
                                 device=device)
    conf: dict = {"insert_cached_attention": {"backend": backend}, "initialize_cache": {}}
    conf.update(extra)
    if compile_backend is not None:
        conf["compile_model"] = {"backend": compile_backend}
    opt = InferenceOptimizer(None, conf)
    mod = opt(cm=cm, mod=gm)
    return mod, cm, opt.history


def greedy_cached(
    mod: nn.Module, cm: CachedSequenceInterface, prompts: list[list[int]], steps: int, chunk: int | None = None
) -> tuple[list[list[int]], list[tuple[int, list[int], torch.Tensor]]]:
    """Prefill all prompts (in chunks of `chunk` tokens if set) and decode `steps` tokens greedily, batched.

    Returns the generated tokens per prompt and every sample taken: (prompt index, context, last logits).
    """
    seqs = [list(p) for p in prompts]
    cached = [0] * len(seqs)
    samples: list[tuple[int, list[int], torch.Tensor]] = []
    while any(len(s) - len(p) < steps for s, p in zip(seqs, prompts)):
        batch = [(i, s[cached[i] :][: chunk or None]) for i, s in enumerate(seqs) if len(s) - len(prompts[i]) < steps]
        batch.sort(key=lambda x: len(x[1]) == 1)  # prefills first
        for i, new in batch:
            cm.pool.ensure_capacity(i, cached[i] + len(new))
        cm.update([StepSequence(new, cached[i], cm.pool.page_table(i)) for i, new in batch])
        with torch.no_grad():
            logits = mod(**cm.named_args)[0, cm.info.last_token_idx]
        for k, (i, new) in enumerate(batch):
            cached[i] += len(new)
            if cached[i] == len(seqs[i]):  # the whole context is in: sample the next token
                samples.append((i, list(seqs[i]), logits[k].float().cpu()))
                seqs[i].append(int(logits[k].argmax()))
    for i in range(len(seqs)):
        cm.pool.free(i)
    return [s[len(p) :] for s, p in zip(seqs, prompts)], samples


def greedy_reference(model: nn.Module, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens from the full (non-cached) forward, recomputed every step."""
    out = []
    dev = next(model.parameters()).device
    for p in prompts:
        s = list(p)
        for _ in range(steps):
            ids = torch.tensor([s], device=dev)
            with torch.no_grad():
                s.append(int(model(ids, torch.arange(len(s), device=dev)[None])[0, -1].argmax()))
        out.append(s[len(p):])
    return out


def calls_by_rows(gm: GraphModule, ref: GraphModule, device: str, calls: list) -> dict[int, int]:
    """Run both graphs on one row, a 5-token prompt and 3 decode rows; their logits must agree. Returns, per row
    count, how many entries `calls` (a list a monkeypatched kernel appends to) gained on that shape."""
    g = torch.Generator().manual_seed(0)
    counted = {}
    for batch, seq in ((1, 1), (1, 5), (3, 1)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)
        pos = torch.arange(seq, device=device).expand(batch, seq) + 3
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(gm(input_ids=ids, position_ids=pos), ref(input_ids=ids, position_ids=pos),
                                       atol=1e-5, rtol=1e-5)
        counted[batch * seq] = len(calls)
    return counted
