"""The rank watchdog through LLM(world_size=2) on gloo: a SIGSTOPped rank fails every waiting caller with its name.

Runs in a subprocess, as a user's script would: what matters there is also what the process prints when it exits
(no leaked-semaphore warning from multiprocessing's resource tracker). The launcher-level cases (a rank that raises,
dies or stops; loopback rendezvous) are in tests/ad_compiler/sharding/test_launch.py.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Short for the test; the ranks' heartbeats stay well under it while they build on a loaded machine (< 2 s).
DIST_TIMEOUT = 6.0

SCRIPT = textwrap.dedent('''
    import asyncio, json, os, signal, sys, threading, time

    def main(folder, dist_timeout):
        import psutil
        from transformers import LlamaConfig
        from ad_cli.distributed_engine import DistributedEngine
        from ad_compiler.distributed.launch import DistributedError
        from ad_runtime import LLM, SamplingParams

        LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256).save_pretrained(folder)
        llm = LLM(model=folder, skip_tokenizer_init=True, skip_loading_weights=True, world_size=2, device="cpu",
                  dtype="float32", max_seq_len=64, attn_page_size=8, max_batch_size=4, dist_timeout=dist_timeout)
        engine = DistributedEngine(llm._backend)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        out = {"health_before": engine.health(), "tokens_before": len(llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids)}
        pids = llm._backend.rank_pids
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        errors = {}

        def ask(name):  # every step needs rank 1's collectives: this waits until the watchdog ends the ranks
            try:
                llm.generate([[4, 5, 6]], params)
                errors[name] = None
            except DistributedError as e:
                errors[name] = [str(e), time.monotonic() - stopped]

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(dist_timeout + 60)
        out["errors"] = errors
        out["health_after"] = engine.health()

        async def http_request():  # what ad-serve would answer now
            return await asyncio.wait_for(engine.submit([1, 2], params, None).get(), 10)

        upd = asyncio.run(http_request())
        out["http"] = {"finished": upd.finished, "error": upd.error}
        try:
            llm.generate([[7]], params)
        except DistributedError as e:
            out["later"] = str(e)
        out["ranks_alive"] = [psutil.pid_exists(p) for p in pids]
        start = time.monotonic()
        llm.shutdown()
        out["shutdown_s"] = time.monotonic() - start
        print(json.dumps(out))

    if __name__ == "__main__":
        main(sys.argv[1], float(sys.argv[2]))
''')


def test_stopped_rank_fails_waiting_callers_and_health_says_why(tmp_path: Path) -> None:
    script = tmp_path / "stop_a_rank.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(DIST_TIMEOUT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    reason = f"rank 1 of 2 stopped answering for {DIST_TIMEOUT:g} s (dist_timeout)"
    assert out["health_before"] is None and out["tokens_before"] == 8
    # Both waiting callers get the watchdog's error, within the timeout + 10 s of the stop (the last heartbeat
    # may have come up to a second before it).
    for name in ("a", "b"):
        message, took = out["errors"][name]
        assert message == reason
        assert DIST_TIMEOUT - 1.5 <= took < DIST_TIMEOUT + 10, took
    assert out["health_after"] == reason
    # An HTTP client would see one line, no traceback.
    assert out["http"]["finished"] and reason in out["http"]["error"] and "\n" not in out["http"]["error"]
    assert out["later"] == reason  # a new caller learns at once
    assert out["ranks_alive"] == [False, False]  # the stopped rank was killed (and reaped) with the other
    assert out["shutdown_s"] < 5
    assert "leaked" not in proc.stderr and "resource_tracker" not in proc.stderr, proc.stderr[-3000:]
