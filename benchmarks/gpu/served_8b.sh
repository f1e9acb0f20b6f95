#!/usr/bin/env bash
# Served figures on the GPU machine (source setup.sh first): ad-serve on random weights in Llama-3.1-8B shapes,
# then serve_bench at 64 and 256 concurrent clients (128/128) and at 1 client (TTFT of a 128-token prompt).
# The engine settings are throughput.py's defaults on the same model folder (setup.sh writes it), so a server
# started after `throughput.py --model-dir /tmp/gpumodels/llama-3.1-8b` loads that run's build cache entry.
# Usage: bash benchmarks/gpu/served_8b.sh [PORT]   (SKIP_256=1: leave out the 256-client run;
#        ENGINE_PROCESS=1 / 0: --args.engine-process=true / false; unset: ad-serve's default, its own process on a GPU)
set -u
PORT=${1:-8177}
LOG=${OUT:-/tmp}/served_8b_server.log
python3 -m ad_cli.serve --port "$PORT" --args.model=/tmp/gpumodels/llama-3.1-8b --args.skip-loading-weights=true \
  --args.dtype=bfloat16 --args.max-batch-size=256 --args.max-num-tokens=8192 --args.max-seq-len=2048 \
  --args.enable-chunked-prefill=true ${ENGINE_PROCESS:+--args.engine-process=$([ "$ENGINE_PROCESS" = 1 ] && echo true || echo false)} \
  > "$LOG" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
start=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { echo "server exited:"; tail -20 "$LOG"; exit 1; }
  sleep 2
done
echo "server ready after $(( $(date +%s) - start )) s"
B="python3 benchmarks/serve_bench.py --base-url http://127.0.0.1:$PORT --ignore-eos"
$B --num-prompts 640 --concurrency 64 --input-len 128 --output-len 128 --warmup 64
[ "${SKIP_256:-0}" = 1 ] || $B --num-prompts 1024 --concurrency 256 --input-len 128 --output-len 128 --warmup 64 --seed 7  # other prompts: no prefix-cache hits
# The engine's own TTFT (arrival at the engine to its first token, the server's ad_time_to_first_token_seconds)
# over the 1-client run, from /metrics before and after it: what the client's TTFT adds beyond it is the
# server's (HTTP, tokenization, delivery of the token to the stream).
ttft() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^ad_time_to_first_token_seconds_(sum|count)/ {sub(/[{].*/, "", $1); printf "%s=%s ", $1, $2}'; }
before=$(ttft)
$B --num-prompts 16 --concurrency 1 --input-len 128 --output-len 16 --warmup 2 --seed 11
after=$(ttft)
python3 - "$before" "$after" <<'PY'
import sys
b, a = ({k.rsplit("_", 1)[1]: float(v) for k, v in (kv.split("=") for kv in arg.split())} for arg in sys.argv[1:3])
n = a.get("count", 0) - b.get("count", 0)
print(f"engine-side TTFT over the 1-client run (its warm-up included): {1e3 * (a['sum'] - b['sum']) / n:.1f} ms mean "
      f"of {n:.0f} requests" if n else "engine-side TTFT: no /metrics figures")
PY
