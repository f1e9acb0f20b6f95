"""LLM freezes what its build left for the garbage collector (no full scans of it while generating) and lets it go
at shutdown: the model is collectable again."""

import gc
import weakref
from pathlib import Path

from ad_runtime import LLM, SamplingParams


def test_build_freezes_and_shutdown_frees_the_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64).save_pretrained(tmp_path)
    gc.unfreeze()
    llm = LLM(model=str(tmp_path), skip_loading_weights=True, skip_tokenizer_init=True, device="cpu",
              max_batch_size=2, max_seq_len=32, build_cache=False)
    assert gc.get_freeze_count() > 0
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2
    module = weakref.ref(llm.engine.runner.module)
    llm.shutdown()
    assert gc.get_freeze_count() == 0
    del llm, out
    gc.collect()
    assert module() is None, "the model outlived shutdown: something kept it frozen or referenced"
