"""insert_cached_attention: torch_attention nodes become paged cached-attention calls, outputs unchanged."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op, placeholder_names, run_shape_prop
from ad_runtime.kv_cache.interface import CachedSequenceInterface, StepSequence
from cached_attention_models import TinyAttentionModel, export_tiny

import ad_runtime  # noqa: F401 - registers the runtime transforms


def _pipeline(gm, cm, backend="torch"):
    opt = InferenceOptimizer(None, {"insert_cached_attention": {"backend": backend}, "initialize_cache": {}})
    gm = opt(cm=cm, mod=gm)
    return gm, opt.history


@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
def test_replaces_ops_and_matches_uncached(layout):
    torch.manual_seed(0)
    model = TinyAttentionModel(layout=layout, n_layers=3).eval()
    gm = export_tiny(model)
    assert count_op(gm, torch.ops.auto_deploy.torch_attention) == 3
    cm = CachedSequenceInterface(max_batch_size=3, max_seq_len=16, page_size=4)
    gm, hist = _pipeline(gm, cm)
    assert hist["insert_cached_attention"].num_matches == 3
    assert count_op(gm, torch.ops.auto_deploy.torch_attention) == 0
    assert count_op(gm, torch.ops.auto_deploy.torch_cached_attention) == 3
    names = placeholder_names(gm)
    assert names[:2] == ["input_ids", "position_ids"]
    assert {"k_cache_0", "v_cache_2", "page_table", "batch_info_host"} <= set(names)
    assert cm.caches["k_cache_0"].shape == (cm.num_pages + 1, 4, 2, 8)
    run_shape_prop(gm)  # new inputs carry meta["val"], so shape propagation still works
    cached = [n for n in gm.graph.nodes if n.target == torch.ops.auto_deploy.torch_cached_attention.default]
    assert tuple(cached[0].meta["val"].shape[2:]) == (4, 8)

    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    for i, p in enumerate(prompts):
        cm.pool.ensure_capacity(i, len(p))
    cm.update([StepSequence(p, 0, cm.pool.page_table(i)) for i, p in enumerate(prompts)])
    out = gm(**cm.named_args)
    assert out.shape == (1, 10, 32)
    with torch.no_grad():
        for i, (p, off) in enumerate(zip(prompts, (0, 7))):
            ref = model(torch.tensor([p]), torch.arange(len(p))[None])
            torch.testing.assert_close(out[:, off : off + len(p)], ref, atol=1e-5, rtol=1e-5)


def test_needs_cm_and_reports_no_match():
    gm = export_tiny(TinyAttentionModel())
    with pytest.raises(CompileError, match="CachedSequenceInterface"):
        InferenceOptimizer(None, {"insert_cached_attention": {"backend": "torch"}})(mod=gm)

    class NoAttn(torch.nn.Module):
        def forward(self, input_ids, position_ids):
            return input_ids * 2 + position_ids

    gm2 = export_tiny(NoAttn())
    cm = CachedSequenceInterface(max_batch_size=1, max_seq_len=8, page_size=4)
    _, hist = _pipeline(gm2, cm)
    assert hist["insert_cached_attention"].skipped and hist["initialize_cache"].skipped


def test_gpu_only_backend_on_a_cpu_is_a_clear_error():
    # The same error whether flashinfer is installed or not: it names the backend and the device.
    gm = export_tiny(TinyAttentionModel())
    cm = CachedSequenceInterface(max_batch_size=1, max_seq_len=8, page_size=4)
    with pytest.raises(CompileError, match="'flashinfer' needs a CUDA GPU, but the device is cpu"):
        _pipeline(gm, cm, backend="flashinfer")


def test_missing_backend_package_names_the_install_hint_once(monkeypatch):
    import sys

    from ad_runtime.attention.registry import AttentionRegistry

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    monkeypatch.delitem(sys.modules, "ad_runtime.attention.flashinfer_backend", raising=False)
    monkeypatch.delitem(AttentionRegistry.entries, "flashinfer", raising=False)
    with pytest.raises(CompileError) as err:
        AttentionRegistry.get("flashinfer")
    assert str(err.value).count("pip install") == 1 and "not installed" in str(err.value)


def test_auto_picks_torch_on_cpu(caplog):
    gm = export_tiny(TinyAttentionModel())
    cm = CachedSequenceInterface(max_batch_size=1, max_seq_len=8, page_size=4)
    with caplog.at_level("INFO"):
        gm, _ = _pipeline(gm, cm, backend="auto")
    assert count_op(gm, torch.ops.auto_deploy.torch_cached_attention) == 2
    assert "auto -> torch" in caplog.text
