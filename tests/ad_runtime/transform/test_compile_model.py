"""compile_model: every compile backend gives the same greedy tokens as the eager cached graph."""

import copy

import pytest
import torch
from ad_compiler.errors import CompileError
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, greedy_reference, tiny_llama

PROMPTS = [[3, 14, 15, 9, 2, 6], [1, 7, 33], [42], [5, 5, 5, 5]]


@pytest.fixture(scope="module")
def cpu_llama():
    model = tiny_llama()
    return model, export_with_attention_ops(model)


def test_auto_on_cpu_is_simple(cpu_llama, caplog):
    model, gm = cpu_llama
    with caplog.at_level("INFO"):
        mod, cm, hist = build_cached(copy.deepcopy(gm), compile_backend="auto")
    assert "auto -> torch-simple" in caplog.text
    assert isinstance(mod, torch.fx.GraphModule)
    tokens, _ = greedy_cached(mod, cm, PROMPTS, steps=3)
    assert tokens == greedy_reference(model, PROMPTS, steps=3)


def _custom_op_calls(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "auto_deploy"]


def test_simple_on_cpu_calls_custom_ops_as_plain_functions(cpu_llama):
    from ad_runtime.compile.direct_calls import call_custom_ops_directly

    _, gm = cpu_llama
    ref, ref_cm, _ = build_cached(copy.deepcopy(gm))
    calls = _custom_op_calls(ref)
    assert "auto_deploy.torch_cached_attention.default" in calls
    mod, cm, _ = build_cached(copy.deepcopy(gm), compile_backend="torch-simple")
    assert _custom_op_calls(mod) == []  # the dispatcher's round trip is skipped
    (got, got_samples), (want, want_samples) = greedy_cached(mod, cm, PROMPTS, 3), greedy_cached(ref, ref_cm, PROMPTS, 3)
    assert got == want
    for (_, _, a), (_, _, b) in zip(got_samples, want_samples):
        assert torch.equal(a, b)  # the same functions run: bit-equal
    assert call_custom_ops_directly(ref) == len(calls) and _custom_op_calls(ref) == []


@pytest.mark.parametrize("backend", ["torch-cudagraph", "torch-opt"])
def test_cuda_graph_backends_refuse_cpu(cpu_llama, backend):
    with pytest.raises(CompileError, match="needs a CUDA device"):
        build_cached(copy.deepcopy(cpu_llama[1]), compile_backend=backend)


@pytest.mark.slow
def test_torch_compile_on_cpu(cpu_llama):
    from ad_compiler.transform.optimizer import InferenceOptimizer
    from ad_runtime.compile.inductor_direct import InductorCompiled
    from ad_runtime.compile.inductor_inlined_ops import inlined_op_bodies

    model, gm = cpu_llama
    # RMSNorm, add+RMSNorm and RoPE as the torch ops a CPU build has (pure ops that Inductor compiles through)
    fusions = {"match_rope_pattern": {}, "match_rope_layout": {"expected_layout": "bsnd"}, "match_rmsnorm_pattern": {},
               "fuse_rmsnorm": {"backend": "torch"}, "fuse_add_rmsnorm": {"backend": "torch"},
               "optimize_rope": {"backend": "torch"}}
    gm = InferenceOptimizer(None, fusions)(mod=copy.deepcopy(gm))
    mod, cm, hist = build_cached(gm, compile_backend="torch-compile")
    assert hist["compile_model"].num_matches == 1
    assert isinstance(mod, InductorCompiled)
    with torch.inference_mode():  # as GraphRunner and CUDA-graph capture call the model
        # Padded decode steps first, as CUDA-graph capture runs them (token count == row count), then one row.
        for rows in (2, 1):
            cm.info.nest_sequences([[0]] * rows, [0] * rows, [[cm.info.scratch_page]] * rows)
            mod(**cm.padded_decode_args(rows))
        tokens, samples = greedy_cached(mod, cm, PROMPTS[:2], steps=3, chunk=4)
        assert tokens == greedy_reference(model, PROMPTS[:2], steps=3)
        for prompt in (PROMPTS[2], PROMPTS[0]):  # one row of one token, one row of many
            assert greedy_cached(mod, cm, [prompt], steps=2)[0] == greedy_reference(model, [prompt], steps=2)
    # One compile serves every step shape, one-token steps included. (With RMSNorm and RoPE as aten patterns the
    # graph needed a second for one-token steps, whose decompositions branch on a size of 1: test_inductor_direct.)
    assert mod.num_compiles == 1, [v.guard_source for v in mod.variants]
    cm.info.nest_sequences([[0]], [0], [[cm.info.scratch_page]])
    assert mod.variants[0].admits([cm.named_args[n] for n in mod.names])
    # The pure torch ops (RMSNorm, add+RMSNorm, RoPE and its table lookup) were compiled through: only the
    # attention op, which writes the caches and reads lengths on the host, is still called.
    inlined = {str(op) for op in inlined_op_bodies(mod.model)}
    assert {"auto_deploy.torch_fused_add_rmsnorm.default", "auto_deploy.torch_rope_with_explicit_cos_sin.default"} <= inlined
    with torch.inference_mode(), torch.profiler.profile() as prof:
        greedy_cached(mod, cm, PROMPTS[:1], steps=1)
    called = {e.name for e in prof.events() if e.name.startswith("auto_deploy::")}
    assert called == {"auto_deploy::torch_cached_attention"}, called


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-simple", "torch-compile", "torch-cudagraph", "torch-opt"])
def test_all_backends_same_greedy_tokens_on_gpu(backend):
    model = tiny_llama(device="cuda")
    gm = export_with_attention_ops(model)
    ref_mod, ref_cm, _ = build_cached(copy.deepcopy(gm), device="cuda", compile_backend="torch-simple")
    ref_tokens, ref_samples = greedy_cached(ref_mod, ref_cm, PROMPTS, steps=6)
    assert ref_tokens == greedy_reference(model, PROMPTS, steps=6)

    conf = {"compile_model": {"backend": backend, "cuda_graph_batch_sizes": [1, 2, 4]}}
    mod, cm, _ = build_cached(copy.deepcopy(gm), device="cuda", **conf)
    # decode batches of 4, then 3 (padded to 4), 2 and 1 as prompts finish at different lengths
    for n in (4, 3, 2, 1):
        tokens, samples = greedy_cached(mod, cm, PROMPTS[:n], steps=6)
        assert tokens == ref_tokens[:n]
    if backend in ("torch-cudagraph", "torch-opt"):
        assert sorted(mod.graphs) == [1, 2, 4]
        assert cm.info.cuda_graph_batch_sizes == [1, 2, 4]
        # the replayed decode logits (3 sequences padded to 4) equal the eager ones
        replays = mod.num_replays
        tokens, samples = greedy_cached(mod, cm, PROMPTS[:3], steps=6)
        assert mod.num_replays > replays
        # the graph's own greedy pick of the last (replayed) step: the argmax of the logits it returned
        assert mod.last_greedy.tolist() == [int(lg.argmax()) for _, _, lg in samples[-3:]]
        eager = {(i, len(c)): lg for i, c, lg in ref_samples}
        for i, c, lg in samples:
            torch.testing.assert_close(lg, eager[(i, len(c))], atol=1e-4, rtol=1e-4)
