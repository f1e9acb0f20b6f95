"""The build cache: a warm build skips export and the graph transforms and answers exactly as a cold one; every key
ingredient changed alone misses; damaged entries are rebuilt with a warning; concurrent builders and ranks each succeed.
And the memory plan made at the cache's cut: its figures match what the build allocates; a rank that cannot fit fails
before any weight is read."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ad_compiler.export.pipeline import factory_from_args
from ad_config import LlmArgs
from ad_runtime import LLM, SamplingParams, build_key
from ad_runtime.build import build_graph
from ad_runtime.build_cache import BuildCacheEntry
from ad_runtime.kv_cache.interface import StepSequence
from ad_runtime.memory_plan import weight_bytes

# A tiny Llama with random weights saved as a checkpoint: weights load from the file as for a real model.
COMMON = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_seq_len=64, attn_page_size=8,
              max_batch_size=2, build_cache=True)
# Linear weights stay parameters (prepack_cpu_linear would swap them for oneDNN's opaque packed copies), so the
# tests that compare each rank's shards can read them.
DENSE = dict(transforms={"prepack_cpu_linear": {"enabled": False}})
PROMPT = [1, 2, 3, 4, 5]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _save_tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _logits_and_tokens(llm: LLM) -> tuple[torch.Tensor, list[int]]:
    runner = llm.engine.runner
    runner.cm.update([StepSequence(PROMPT, 0, [0], slot=0)])
    with torch.no_grad():
        logits = runner.module(**runner.cm.named_args).clone()
    return logits, llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One cold build that stores its entry: the folder, the cache, and what the model answered."""
    root = tmp_path_factory.mktemp("build_cache")
    folder = _save_tiny_llama(root / "tiny")
    cache = root / "cache"
    with LLM(model=str(folder), build_cache_dir=str(cache), **COMMON) as llm:
        (report,) = llm.build_reports
        logits, tokens = _logits_and_tokens(llm)
        runner = llm.engine.runner
        allocated = {"weights": weight_bytes(runner.module),
                     "kv": sum(t.numel() * t.element_size() for t in runner.cm.caches.values())}
    return {"folder": folder, "cache": cache, "report": report, "logits": logits, "tokens": tokens,
            "allocated": allocated}


def _entry(args: LlmArgs, rank: int = 0) -> BuildCacheEntry:
    factory = factory_from_args(args, device="cpu")
    entry = BuildCacheEntry.for_build(args, factory, torch.device("cpu"), rank, args.world_size)
    assert entry is not None
    return entry


def test_a_hit_skips_export_and_answers_like_the_cold_build(cold: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cold["report"].cache == "miss" and cold["report"].entry.is_file()
    from ad_compiler.transform.library import export_to_gm

    monkeypatch.setattr(export_to_gm, "torch_export_to_gm", lambda *a, **k: pytest.fail("a hit must not export"))
    with LLM(model=str(cold["folder"]), build_cache_dir=str(cold["cache"]), **COMMON) as llm:
        (report,) = llm.build_reports
        logits, tokens = _logits_and_tokens(llm)
    assert report.cache == "hit" and report.entry == cold["report"].entry
    # The timings say what ran in this process: the cold build exported, the warm one loaded the entry instead.
    assert "export" in cold["report"].stages and "export_to_gm" in cold["report"].transforms
    assert "build cache load" in report.stages and "export" not in report.stages
    assert "compile" in report.stages and "build cache load" in report.timings()
    assert torch.equal(logits, cold["logits"])
    assert tokens == cold["tokens"] and len(tokens) == GREEDY.max_tokens


def test_a_cold_build_goes_on_from_the_graph_the_entry_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile's own on-disk caches (AOTAutograd's) key on the traced graph: a cold build that compiled its
    # in-memory graph wrote entries that no warm build (which unpickles the entry) ever found.
    import ad_runtime.build as build

    seen: list[bytes] = []
    real = build.loads_graph
    monkeypatch.setattr(build, "loads_graph", lambda data: seen.append(data) or real(data))
    folder = _save_tiny_llama(tmp_path / "tiny")
    args = LlmArgs(model=str(folder), build_cache_dir=str(tmp_path / "cache"), **COMMON)
    _, _, _, report = build_graph(args)
    assert report.cache == "miss" and len(seen) == 1
    assert _entry(args).load() is not None and _graph_bytes_of(report.entry) == seen[0]


def _graph_bytes_of(path: Path) -> bytes:
    """The graph bytes an entry file holds."""
    import pickle

    from ad_runtime.build_cache import _read_checked

    return pickle.loads(_read_checked(path))["graph"]


def test_each_key_ingredient_alone_misses(cold: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cold["cache"]), **COMMON)
    hit = _entry(base)
    assert hit.path == cold["report"].entry and hit.load() is not None

    changed = {
        "model config": _entry(base.model_copy(update={"model_kwargs": {"rms_norm_eps": 1e-5}})),
        "transform option": _entry(LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cold["cache"]),
                                           transforms={"fuse_gemms": {"enabled": False}}, **COMMON)),
        "world_size": _entry(base.model_copy(update={"world_size": 2})),
        "dtype": _entry(base.model_copy(update={"dtype": "bfloat16"})),
    }
    # The checkpoint: the same folder, its weights file rewritten (a new mtime).
    copy = tmp_path / "tiny"
    shutil.copytree(cold["folder"], copy)
    before = _entry(base.model_copy(update={"model": str(copy)}))
    weights = copy / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed["checkpoint file"] = _entry(base.model_copy(update={"model": str(copy)}))
    assert changed["checkpoint file"].path != before.path
    # A package version (torch's, as an upgrade would change it).
    real_version = build_key.version
    monkeypatch.setattr(build_key, "version", lambda name: "99.0" if name == "torch" else real_version(name))
    changed["package version"] = _entry(base)
    monkeypatch.setattr(build_key, "version", real_version)

    paths = {what: e.path for what, e in changed.items()}
    assert len(set(paths.values()) | {hit.path}) == len(paths) + 1, paths
    for what, entry in changed.items():
        assert entry.load() is None, what  # nothing stored under that key: a miss
    # Runtime-only settings (sampling, seed, KV cache bound) leave the graph, and the key, as they were.
    same = base.model_copy(update={"seed": 7, "kv_cache_config": {"max_tokens": 32}, "enable_chunked_prefill": True})
    assert _entry(same).path == hit.path


def test_a_truncated_entry_is_rebuilt_with_a_warning(cold: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = cache / cold["report"].entry.name
    data = cold["report"].entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="ad_runtime"):
        with LLM(model=str(cold["folder"]), build_cache_dir=str(cache), **COMMON) as llm:
            (report,) = llm.build_reports
            logits, tokens = _logits_and_tokens(llm)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "rebuilding" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert report.cache == "miss" and report.entry == entry
    assert torch.equal(logits, cold["logits"]) and tokens == cold["tokens"]
    assert _entry(LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cache), **COMMON)).load() is not None


def test_an_unwritable_cache_is_a_warning_and_the_build_goes_on(cold: dict, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with caplog.at_level(logging.WARNING, logger="ad_runtime"):
        *_, report = build_graph(LlmArgs(model=str(cold["folder"]), build_cache_dir=str(not_a_folder), **COMMON))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not write build cache entry" in warnings[0] and str(not_a_folder) in warnings[0]
    assert report.cache == "miss (not stored)"


BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    from ad_config import LlmArgs
    from ad_runtime.build import build_graph
    folder, cache, common = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    *_, report = build_graph(LlmArgs(model=folder, build_cache_dir=cache, **common))
    print(json.dumps({"cache": report.cache, "entry": str(report.entry)}))
""")


@pytest.mark.slow
def test_two_processes_building_the_same_entry_both_succeed(cold: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", BUILD_SCRIPT, str(cold["folder"]), str(cache), json.dumps(COMMON)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "unusable" not in err and "could not write" not in err, err
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert {r["entry"] for r in reports} == {str(cache / cold["report"].entry.name)}
    assert all(r["cache"] in ("miss", "hit") for r in reports)  # both built, or the later one found the entry
    assert [p.name for p in cache.iterdir()] == [cold["report"].entry.name]  # no temporary files left behind
    assert _entry(LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cache), **COMMON)).load() is not None


@pytest.mark.slow
def test_world_size_2_caches_each_rank(cold: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with LLM(model=str(cold["folder"]), build_cache_dir=str(cache), world_size=2, **COMMON, **DENSE) as llm:
        reports = llm.build_reports
        tokens = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    assert [r.cache for r in reports] == ["miss", "miss"]
    assert sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == ["rank0of2.adbuild", "rank1of2.adbuild"]
    assert tokens == cold["tokens"]  # the sharded model answers like the single-rank one
    # Each rank finds its own entry: its own shard of every split weight (a warm build runs no collective before
    # serving, so this needs no process group; the ranks' answers are checked above).
    args = LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cache), world_size=2, **COMMON, **DENSE)
    shards = []
    for rank, report in enumerate(reports):
        module, _, _, again = build_graph(args, rank=rank, world_size=2)
        assert again.cache == "hit" and again.entry == report.entry
        shards.append(dict(module.named_parameters()))
    full = dict(_single_rank_module(cold).named_parameters())
    split = [name for name, p in shards[0].items() if p.shape != full[name].shape]
    assert any("o_proj" in name for name in split) and any("down_proj" in name for name in split), split
    for name in split:
        dim = _split_dim(shards[0][name], full[name])
        assert shards[0][name].shape[dim] * 2 == full[name].shape[dim], name
        if "fused" not in name:  # a fused q/k/v weight holds each part's shard: not one contiguous slice
            assert torch.equal(torch.cat([shards[0][name], shards[1][name]], dim=dim), full[name]), name
        assert not torch.equal(shards[0][name], shards[1][name]), name


def _single_rank_module(cold: dict) -> torch.nn.Module:
    module, *_ = build_graph(LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cold["cache"]), **COMMON, **DENSE))
    return module


def _split_dim(shard: torch.Tensor, full: torch.Tensor) -> int:
    return next(d for d, (a, b) in enumerate(zip(shard.shape, full.shape)) if a != b)


def test_the_memory_plan_matches_what_the_build_allocates(cold: dict) -> None:
    plan = cold["report"].memory
    assert plan is not None and plan.weight_bytes > 0 and plan.kv_bytes > 0
    # Weights within 5%: later transforms add small tables (optimize_rope's cos/sin cache). KV pages: exact.
    assert plan.weight_bytes <= cold["allocated"]["weights"] <= 1.05 * plan.weight_bytes
    assert plan.kv_bytes == cold["allocated"]["kv"]
    # 2 layers x (k + v) x 2 KV heads x head_dim 16 x 4 bytes (float32)
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    # Activations at max_num_tokens: at least the MLP's gate and up outputs (intermediate 128, float32) a token.
    assert plan.activation_bytes >= plan.max_num_tokens * 2 * 128 * 4 > 0, plan.summary()
    assert "activations" in plan.summary()


def test_a_rank_that_cannot_fit_fails_before_any_weight_is_read(cold: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from ad_compiler.errors import CompileError
    from ad_compiler.models.hf import AutoModelForCausalLMFactory
    from ad_runtime import memory_plan

    monkeypatch.setattr(memory_plan, "device_free_bytes", lambda device: 64 * 1024)
    monkeypatch.setattr(AutoModelForCausalLMFactory, "load_or_random_init",
                        lambda *a, **k: pytest.fail("weights were read"))
    args = LlmArgs(model=str(cold["folder"]), build_cache_dir=str(cold["cache"]), **COMMON)
    with pytest.raises(CompileError) as err:
        build_graph(args)
    message = str(err.value)
    assert "\n" not in message and "rank 0 needs" in message and "GiB short" in message, message
    assert "world_size" in message and "max_seq_len" in message
