"""Hybrid Mamba2 + attention (Bamba) and pure Mamba2 models through LLM equal Hugging Face greedy decoding (CPU, fp32)."""

import pytest
import torch
from ad_runtime import LLM, SamplingParams
from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM

pytestmark = pytest.mark.slow

NEW_TOKENS = 12
# Different lengths: a one-token prompt (it runs with the decodes), prompts shorter and longer than the chunk.
PROMPTS = [[5], [3, 17, 29, 8, 41, 12, 7, 30, 22, 9, 14, 2, 33, 19, 25, 6, 11, 38, 4], [21, 13, 8], [40, 1, 2, 3, 4, 5, 6]]
BAMBA = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2,
             mamba_d_state=6, mamba_expand=1, mamba_chunk_size=8, mamba_d_conv=4, tie_word_embeddings=False)
MAMBA2 = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2, state_size=6,
              expand=2, chunk_size=8, conv_kernel=4, tie_word_embeddings=False)
COMMON = dict(device="cpu", dtype="float32", skip_tokenizer_init=True, attn_backend="torch",
              compile_backend="torch-simple", max_seq_len=64, attn_page_size=8)


def _folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[str, list[list[int]]]:
    cls, config = {"bamba": (BambaForCausalLM, BambaConfig(**BAMBA)),
                   "mamba2": (Mamba2ForCausalLM, Mamba2Config(**MAMBA2))}[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    # The reference recomputes the whole sequence without a cache at every step: the model's definition.
    # (HF generate's cached Mamba2 path drifts from its own uncached forward in transformers 5.17, so it is no
    # reference; for Bamba both agree.)
    refs = []
    with torch.inference_mode():
        for p in PROMPTS:
            seq = list(p)
            for _ in range(NEW_TOKENS):
                seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
            refs.append(seq[len(p):])
    return str(folder), refs


@pytest.fixture(scope="module", params=["bamba", "mamba2"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[list[int]]]:
    return _folder(tmp_path_factory, request.param)


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def test_batched_prompts_equal_hf(model: tuple[str, list[list[int]]]) -> None:
    folder, refs = model
    with LLM(folder, max_batch_size=4, **COMMON) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        assert llm.engine.runner.cm.state_specs, "the graph keeps no Mamba state"
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_chunked_prefill_and_slot_reuse_equal_hf(model: tuple[str, list[list[int]]]) -> None:
    """Two slots for four prompts (slots are reused), prompts split into 5-token chunks (state carried over)."""
    folder, refs = model
    with LLM(folder, max_batch_size=2, max_num_tokens=5, enable_chunked_prefill=True, **COMMON) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_preempted_hybrid_requests_restart_their_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Bamba with a KV pool too small for all four at once: preempted requests recompute from token 0 in
    whatever slot they get next, so their Mamba state restarts too."""
    folder, refs = _folder(tmp_path_factory, "bamba")
    # 4 pages of 8 tokens: the 19-token prompt plus its 12 new tokens alone need 4.
    with LLM(folder, max_batch_size=4, kv_cache_config={"max_tokens": 32}, **COMMON) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
    assert sum(o.metrics.num_preemptions for o in outs) > 0, "the pool should have forced preemptions"
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_bamba_sharded_over_two_ranks_keeps_state_per_rank(tmp_path_factory: pytest.TempPathFactory) -> None:
    """World size 2 (gloo) with the ssm heuristic: each rank keeps the state of its half of the Mamba heads."""
    folder, refs = _folder(tmp_path_factory, "bamba")
    detect = {"sharding_dims": ["ssm", "tp"], "sharding_source": ["heuristic"]}
    with LLM(folder, world_size=2, max_batch_size=4, transforms={"detect_sharding": detect}, **COMMON) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == refs
