"""gather_logits_before_lm_head: the LM head sees only each sequence's last token; those logits are unchanged."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import placeholder_names, run_shape_prop
from ad_runtime.kv_cache.interface import CachedSequenceInterface, StepSequence
from tiny_llama import VOCAB, export_with_attention_ops, tiny_llama

import ad_runtime  # noqa: F401 - registers the runtime transforms

# Two prefills (one of them a second chunk over cached tokens) and a decode in one step.
STEP1 = [([1, 2, 3, 4, 5], 0), ([9, 8, 7], 0), ([4], 0)]
STEP2 = [([6, 7], 5), ([6], 3), ([5], 1)]


def _build(gm, gather: bool, hoist: bool = True):
    cm = CachedSequenceInterface(max_batch_size=4, max_seq_len=32, page_size=4)
    conf: dict = {"insert_cached_attention": {"backend": "torch"}, "initialize_cache": {}}
    if gather:
        conf = {"gather_logits_before_lm_head": {"hoist": hoist}, **conf}
    opt = InferenceOptimizer(None, conf)
    return opt(cm=cm, mod=gm), cm, opt.history


def _run(gm, cm, steps):
    outs = []
    for step in steps:
        for i, (ids, cached) in enumerate(step):
            cm.pool.ensure_capacity(i, cached + len(ids))
        cm.update([StepSequence(ids, cached, cm.pool.page_table(i)) for i, (ids, cached) in enumerate(step)])
        with torch.no_grad():
            outs.append(gm(**cm.named_args))
    return outs


@pytest.mark.parametrize("hoist", [False, True])
def test_gathers_before_lm_head_and_matches_full_logits(hoist):
    model = tiny_llama()
    full_gm, full_cm, _ = _build(export_with_attention_ops(model), gather=False)
    gm, cm, hist = _build(export_with_attention_ops(model), gather=True, hoist=hoist)
    assert hist["gather_logits_before_lm_head"].num_matches == 1
    assert "last_token_idx" in placeholder_names(gm)
    assert "last_token_idx" in cm.metadata_names
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    picks = [n for n in gm.graph.nodes if n.target == torch.ops.aten.index_select.default]
    if hoist:
        # The last layer's o_proj reads the gathered attention output; its residual input is gathered too, so
        # o_proj, the MLP (gate, up, down) and the LM head run on one row per sequence.
        o_proj = linears[-5]
        assert len(picks) == 2 and o_proj.args[0] in picks
        assert all(p.args[0].target != torch.ops.aten.linear.default for p in picks)
    else:
        assert len(picks) == 1 and linears[-1].args[0] is picks[0]
    run_shape_prop(gm)  # the new input carries meta["val"]

    full = _run(full_gm, full_cm, [STEP1, STEP2])
    got = _run(gm, cm, [STEP1, STEP2])
    for step, f, g in zip([STEP1, STEP2], full, got):
        last = torch.tensor([sum(len(ids) for ids, _ in step[: i + 1]) - 1 for i in range(len(step))])
        assert g.shape == (1, len(step), VOCAB)
        torch.testing.assert_close(g[0], f[0, last], atol=1e-5, rtol=1e-5)


class _SoftCapHead(torch.nn.Module):
    """Gemma-style tail: lm_head, then cast and tanh soft-cap before the output."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids) + position_ids[..., None].float()
        return torch.tanh(self.head(x).float() / 30.0) * 30.0


def _export(model):
    from ad_compiler.export import torch_export_to_gm
    from torch.export import Dim

    ids, pos = torch.randint(0, 16, (2, 5)), torch.arange(5).expand(2, 5)
    dyn = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    return torch_export_to_gm(model, kwargs={"input_ids": ids, "position_ids": pos},
                              dynamic_shapes={"input_ids": dyn, "position_ids": dyn})


def test_walks_through_soft_cap_and_keeps_values():
    torch.manual_seed(0)
    model = _SoftCapHead().eval()
    cm = CachedSequenceInterface(max_batch_size=4, max_seq_len=32, page_size=4)
    opt = InferenceOptimizer(None, {"gather_logits_before_lm_head": {}})
    gm = opt(cm=cm, mod=_export(model))
    assert opt.history["gather_logits_before_lm_head"].num_matches == 1
    step = [([1, 2, 3], 0), ([4, 5], 2), ([6], 7)]
    for i, (ids, cached) in enumerate(step):
        cm.pool.ensure_capacity(i, cached + len(ids))
    cm.update([StepSequence(ids, cached, cm.pool.page_table(i)) for i, (ids, cached) in enumerate(step)])
    args = cm.named_args
    out = gm(**args)
    with torch.no_grad():
        ref = model(args["input_ids"], args["position_ids"])[0, [2, 4, 5]]
    assert out.shape == (1, 3, 16)
    torch.testing.assert_close(out[0], ref)


def test_skips_without_lm_head_and_needs_cm():
    class NoHead(torch.nn.Module):
        def forward(self, input_ids, position_ids):
            return input_ids * 2 + position_ids

    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=8, page_size=4)
    opt = InferenceOptimizer(None, {"gather_logits_before_lm_head": {}})
    gm = opt(cm=cm, mod=_export(NoHead()))
    info = opt.history["gather_logits_before_lm_head"]
    assert info.skipped and info.num_matches == 0
    assert "last_token_idx" not in placeholder_names(gm)
    assert "last_token_idx" not in cm.metadata_names
    with pytest.raises(CompileError, match="CachedSequenceInterface"):
        InferenceOptimizer(None, {"gather_logits_before_lm_head": {}})(mod=_export(_SoftCapHead()))


def _reads(node, sources: set) -> bool:
    """Whether `node` depends on any of `sources`."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in sources:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


class _FeatureAndTokenTail(torch.nn.Module):
    """A tail of feature-wise splits and means (token-wise), or with a mean over the tokens (not token-wise)."""

    def __init__(self, over_tokens: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8, bias=False)
        self.head = torch.nn.Linear(4, 16, bias=False)
        self.over_tokens = over_tokens

    def forward(self, input_ids, position_ids):
        x = self.proj(self.emb(input_ids) + position_ids[..., None].float())
        if self.over_tokens:
            x = x - x.mean(1, keepdim=True)
        a, b = torch.split(x, 4, -1)
        return self.head(a * b / b.pow(2).mean(-1, keepdim=True).add(1.0))


@pytest.mark.parametrize("over_tokens", [False, True])
def test_hoists_over_feature_wise_ops_only(over_tokens):
    torch.manual_seed(0)
    model = _FeatureAndTokenTail(over_tokens).eval()
    cm = CachedSequenceInterface(max_batch_size=4, max_seq_len=32, page_size=4)
    opt = InferenceOptimizer(None, {"gather_logits_before_lm_head": {}})
    gm = opt(cm=cm, mod=_export(model))
    picks = {n for n in gm.graph.nodes if n.target == torch.ops.aten.index_select.default}
    means = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mean.dim]
    splits = [n for n in gm.graph.nodes if "split" in str(n.target)]
    # The feature split and the mean over features move below the gather; a mean over the tokens must see them all.
    assert splits and all(_reads(n, picks) for n in splits)
    assert [_reads(n, picks) for n in means] == ([False, True] if over_tokens else [True])
    step = [([1, 2, 3, 4], 0), ([5, 6], 4)]
    for i, (ids, cached) in enumerate(step):
        cm.pool.ensure_capacity(i, cached + len(ids))
    cm.update([StepSequence(ids, cached, cm.pool.page_table(i)) for i, (ids, cached) in enumerate(step)])
    args = cm.named_args
    with torch.no_grad():
        ref = model(args["input_ids"], args["position_ids"])[0, [3, 5]]
    torch.testing.assert_close(gm(**args)[0], ref)
