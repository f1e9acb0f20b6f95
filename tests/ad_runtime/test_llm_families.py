"""More model families through LLM on the CPU: greedy tokens equal Hugging Face `generate` (small random configs).

Each family brings something the Llama path does not: learned attention sinks and a sliding window on
alternate layers (gpt-oss), computed buffers the model keeps on the CPU while built on meta (Cohere's
rotary table, NemotronH's router bias), ungated MoE experts stored per expert (NemotronH), multi-head latent
attention (DeepSeek-V3), attention beside Mamba2 in one layer (Falcon-H1), short convs with state (LFM2), MoE
routers of several kinds, QK norms, partial rotary, LayerNorm instead of RMSNorm, gated delta-net linear
attention with per-sequence state (Qwen3-Next, Qwen3.5), lightning attention (MiniMax). A mixer we do not cache
must fail the build, never decode wrongly.
"""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
_DELTA_NET = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
FAMILIES = {
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"])),
    "cohere": ("CohereConfig", {}),
    "nemotron_h_moe": ("NemotronHConfig", dict(
        layers_block_type=["linear_attention", "full_attention", "moe"], mamba_num_heads=8, mamba_head_dim=16,
        n_groups=2, ssm_state_size=16, expand=2, chunk_size=4, conv_kernel=4, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_group=1,
        topk_group=1)),
    # Multi-head latent attention: low-rank q and kv, query/key head dim 16 (8 rotary) and value head dim 16.
    "deepseek_v3": ("DeepseekV3Config", dict(
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
        topk_group=1, head_dim=8)),
    # Hybrid with attention and Mamba2 side by side in every layer.
    "falcon_h1": ("FalconH1Config", dict(
        mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_expand=2,
        mamba_chunk_size=4, mamba_d_conv=4)),
    # Short causal convs (kernel 3) between attention layers: per-sequence conv state like Mamba's.
    "lfm2": ("Lfm2Config", dict(layer_types=["conv", "full_attention"], block_ff_dim=128)),
    # Gated delta-net linear attention (conv + recurrent state per sequence) beside full attention.
    "qwen3_next": ("Qwen3NextConfig", dict(_DELTA_NET, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32)),
    "qwen3_5": ("Qwen3_5TextConfig", dict(_DELTA_NET)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(_DELTA_NET, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    # Granite 4.0: Mamba2 layers, attention layers, MoE everywhere.
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(
        layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_expand=2, mamba_chunk_size=4,
        mamba_d_conv=4)),
    # Zamba2: Mamba2 backbone with a shared attention block.
    "zamba2": ("Zamba2Config", dict(
        mamba_d_state=16, mamba_headdim=16, n_mamba_heads=8, mamba_ngroups=2, layers_block_type=["mamba", "hybrid"],
        num_mem_blocks=1, chunk_size=4, attention_head_dim=16)),
    "cohere2": ("Cohere2Config", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "glm4_moe": ("Glm4MoeConfig", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1,
                                       pad_token_id=0)),
    # Lightning attention (decayed linear attention, state per sequence) beside softmax attention.
    "minimax": ("MiniMaxConfig", dict(num_local_experts=2, num_experts_per_tok=1,
                                      layer_types=["linear_attention", "full_attention"])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "llama4_text": ("Llama4TextConfig", dict(num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=128)),
    "olmo2": ("Olmo2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5)),  # its checkpoints call the LM head embed_out
    "phi": ("PhiConfig", {}),
    "stablelm": ("StableLmConfig", {}),
}
NEW_TOKENS = 12


def _save(family: str, folder) -> None:
    import transformers

    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**SMALL, **extra})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    # Different lengths: one shorter than gpt-oss's window of 4, two longer (the window then cuts keys).
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 11, 23)]


def _hf_greedy(folder, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def _llm(folder, device: str = "cpu", **kwargs) -> LLM:
    return LLM(model=str(folder), skip_tokenizer_init=True, device=device, dtype="float32", max_seq_len=64,
               attn_page_size=8, max_batch_size=4, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_generates_like_hf(family, tmp_path):
    _save(family, tmp_path)
    prompts = _prompts()
    with _llm(tmp_path) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    assert got == _hf_greedy(tmp_path, prompts)


def test_unrecognised_attention_is_an_error_not_wrong_tokens(tmp_path, monkeypatch):
    """Without its export patch gpt-oss attention stays eager; building must fail instead of decoding uncached."""
    import contextlib

    from ad_compiler.export.patches import ExportPatchRegistry

    ExportPatchRegistry.names()  # import the built-in patches before replacing one
    monkeypatch.setitem(ExportPatchRegistry.entries, "hf_gpt_oss_attention", contextlib.nullcontext)
    _save("gpt_oss", tmp_path)
    with pytest.raises(CompileError, match="not recognised as attention"):
        _llm(tmp_path)


def test_uncached_linear_attention_is_an_error_not_wrong_tokens(tmp_path, monkeypatch):
    """Without its export patch MiniMax's lightning attention stays plain ops with no state cache: verify_cached_decode
    must fail the build instead of letting it decode wrongly."""
    import contextlib

    from ad_compiler.export.patches import ExportPatchRegistry

    ExportPatchRegistry.names()  # import the built-in patches before replacing one
    monkeypatch.setitem(ExportPatchRegistry.entries, "hf_minimax_lightning", contextlib.nullcontext)
    _save("minimax", tmp_path)
    with pytest.raises(CompileError, match="cached decoding disagrees with prefill"):
        _llm(tmp_path)


@pytest.mark.parametrize("family", ["cohere", "deepseek_v3", "gpt_oss", "lfm2", "qwen3_5"])
def test_family_sharded_over_two_ranks_generates_like_hf(family, tmp_path):
    """Two gloo ranks with the default heuristics: CPU buffers (Cohere's rotary table, DeepSeek's router bias)
    on the sharded graph, MLA and sinks split by heads or simple-sharded, LFM2's conv kept whole."""
    _save(family, tmp_path)
    prompts = _prompts()
    with _llm(tmp_path, world_size=2) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(tmp_path, prompts)


def test_multimodal_qwen3_5_checkpoint_runs_its_text_model(tmp_path):
    """A Qwen3.5 checkpoint as published (vision tower + text model under model.language_model) builds the text
    model, ignores the vision weights, and generates like HF's causal LM loaded from the same folder."""
    import transformers

    config = transformers.Qwen3_5Config(text_config={**SMALL, **FAMILIES["qwen3_5"][1]},
                                        vision_config=dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64))
    torch.manual_seed(0)
    transformers.Qwen3_5ForConditionalGeneration(config).save_pretrained(tmp_path)
    prompts = _prompts()
    with _llm(tmp_path) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(tmp_path, prompts)


# Structures the one-row GEMV fusions meet: sinks and MoE (gpt_oss), MLA (deepseek_v3), a norm feeding attention and
# MLP at once (cohere), norms after the blocks (olmo2), LayerNorm (phi), MoE with a shared expert (glm4_moe, qwen3_moe),
# a hybrid with Mamba2 (falcon_h1), short convs (lfm2).
GPU_FAMILIES = ["cohere", "deepseek_v3", "falcon_h1", "glm4_moe", "gpt_oss", "lfm2", "olmo2", "phi", "qwen3_moe"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_family_batch_1_on_gpu_decodes_the_same_with_the_norm_in_the_gemv(family, tmp_path, monkeypatch):
    # One prompt at a time: batch-1 decode steps take the one-row GEMV ops, with and without fuse_add_rmsnorm_gemv.
    from ad_runtime.kernels.triton import gemv as gemv_module

    calls = []
    real = gemv_module.add_rmsnorm_gemv
    monkeypatch.setattr(gemv_module, "add_rmsnorm_gemv", lambda *a: calls.append(1) or real(*a))
    _save(family, tmp_path)
    got = {}
    for fused in (True, False):
        with _llm(tmp_path, device="cuda", compile_backend="torch-simple",
                  transforms={"fuse_add_rmsnorm_gemv": {"enabled": fused}}) as llm:
            got[fused] = [llm.generate([p], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                           ignore_eos=True))[0].outputs[0].token_ids
                          for p in _prompts()]
        if fused:
            print(f"{family}: {len(calls)} fused add+norm+GEMV launches")  # noqa: T201 - which families fuse
            # Layer 1's input norm (an add + RMSNorm) feeds the merged q/k/v GEMV in these Llama-like blocks.
            assert calls or family not in ("gpt_oss", "glm4_moe", "qwen3_moe")
    assert got[True] == got[False]




def _hf_logit_gaps(folder, prompts: list[list[int]], outputs: list[list[int]], device: str) -> list[float]:
    """Teacher-forced: for each generated token, HF's best logit minus HF's logit of that token at its position
    (0 where the token is HF's greedy choice). Robust to the near-ties of tiny random models, where another
    kernel's rounding may pick the runner-up: such a gap is ~1e-5, a wrong token's is far larger."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    gaps = []
    with torch.no_grad():
        for p, out in zip(prompts, outputs):
            ids = torch.tensor([p + out], device=device)
            logits = model(ids).logits[0, len(p) - 1 : len(p) - 1 + len(out)].float()
            picked = logits.gather(1, torch.tensor(out, device=device)[:, None])[:, 0]
            gaps += (logits.max(dim=1).values - picked).tolist()
    return gaps


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_on_gpu_default_backends_decodes_hf_greedy_tokens(family, tmp_path):
    # The GPU default path (compile_backend auto -> torch-opt: Inductor and decode CUDA graphs; attention auto ->
    # triton), which the CPU tests above never take; it once failed every model with per-sequence state.
    _save(family, tmp_path)
    prompts = _prompts()
    with _llm(tmp_path, device="cuda") as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == NEW_TOKENS for t in got)
    gaps = _hf_logit_gaps(tmp_path, prompts, got, "cuda")
    assert max(gaps) < 1e-3, f"{family}: a generated token is {max(gaps):.2e} below HF's best logit"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["olmo2", "phi", "qwen3_moe"])
def test_family_in_bf16_on_gpu_decodes_hf_greedy_tokens_through_the_skinny_gemm(family, tmp_path, monkeypatch):
    # bf16 decode steps of 2-4 rows take the Triton skinny GEMM for every linear (fp32 keeps cuBLAS, so the test
    # above never reaches it). bf16 rounds logits by ~1e-2 where a wrong token sits ~1 below HF's best.
    from ad_runtime.kernels.triton import skinny_gemm

    calls = []
    real = skinny_gemm.skinny_linear
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _save(family, tmp_path)
    prompts = _prompts()
    with LLM(model=str(tmp_path), skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_seq_len=64,
             attn_page_size=8, max_batch_size=4) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    assert calls, "no linear took the skinny GEMM"
    gaps = _hf_logit_gaps(tmp_path, prompts, got, "cuda")
    assert max(gaps) < 0.1, f"{family}: a generated token is {max(gaps):.2e} below HF's best logit"
