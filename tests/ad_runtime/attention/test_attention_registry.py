"""`auto` attention backend: triton on a GPU, flashinfer for an fp8 KV cache when it is there, torch on a CPU."""

import importlib.util

import pytest
import torch
from ad_runtime.attention import registry


@pytest.fixture
def available(monkeypatch):
    """Pretend which backends can be built (no GPU or flashinfer needed to choose)."""
    usable: set[str] = set()
    monkeypatch.setattr(registry, "_usable", lambda name: name in usable)
    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flashinfer" and "flashinfer" in usable else real(name, *a))
    return usable


def test_auto_is_triton_on_a_gpu_even_with_flashinfer(available):
    available |= {"triton", "flashinfer"}
    assert registry.resolve_attention_backend("auto", "cuda") == "triton"
    assert registry.resolve_attention_backend("auto", "cuda", torch.bfloat16) == "triton"


def test_an_fp8_cache_takes_flashinfer_when_it_is_there(available):
    available |= {"triton", "flashinfer"}
    assert registry.resolve_attention_backend("auto", "cuda", torch.float8_e4m3fn) == "flashinfer"
    available.discard("flashinfer")
    assert registry.resolve_attention_backend("auto", "cuda", torch.float8_e4m3fn) == "triton"


def test_without_triton_a_gpu_falls_back_to_flashinfer_then_torch(available):
    available.add("flashinfer")
    assert registry.resolve_attention_backend("auto", "cuda") == "flashinfer"
    available.clear()
    assert registry.resolve_attention_backend("auto", "cuda") == "torch"


def test_cpu_and_explicit_names(available):
    available |= {"triton", "flashinfer"}
    assert registry.resolve_attention_backend("auto", "cpu") == "torch"
    assert registry.resolve_attention_backend("flashinfer", "cuda") == "flashinfer"
