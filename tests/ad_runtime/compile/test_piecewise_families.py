"""Piecewise graphs (emulated on the CPU) on families whose graphs differ from Llama's: Mamba2 state and MoE
(NemotronH), multi-head latent attention (DeepSeek-V3), lightning attention with expanded outputs (MiniMax).
Greedy tokens through the pieces equal the engine's own, over chunked mixed steps."""

import sys
import tempfile
from pathlib import Path

import pytest
from ad_runtime import LLM, SamplingParams
from ad_runtime.compile.piecewise import PiecewiseGraphs, emulated_capturer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_llm_families import NEW_TOKENS, _prompts, _save  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["nemotron_h_moe", "deepseek_v3", "minimax"])
def test_pieces_give_the_engines_tokens(family):
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as folder:
        _save(family, folder)
        with LLM(model=folder, device="cpu", skip_tokenizer_init=True, max_batch_size=4, max_seq_len=64,
                 enable_chunked_prefill=True, max_num_tokens=32) as llm:
            want = [o.outputs[0].token_ids for o in llm.generate(_prompts(), sp)]
            runner = llm.engine.runner
            pw = PiecewiseGraphs(runner.module, runner.cm, [16, 32], fallback=runner.module,
                                 capturer=emulated_capturer)
            runner.module = pw
            got = [o.outputs[0].token_ids for o in llm.generate(_prompts(), sp)]
    assert pw.num_pieces_captured >= 2 and pw.num_replays >= 2
    assert got == want
