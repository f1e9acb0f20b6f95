#!/usr/bin/env bash
# Served figures on the GPU machine (source setup.sh first): ad-serve on random weights in Llama-3.1-8B shapes,
# then serve_bench at 64 and 256 concurrent clients (128/128) and at 1 client (TTFT of a 128-token prompt).
# The engine settings are throughput.py's defaults on the same model folder (setup.sh writes it), so a server
# started after `throughput.py --model-dir /tmp/gpumodels/llama-3.1-8b` loads that run's build cache entry.
# Usage: bash benchmarks/gpu/served_8b.sh [PORT]   (SKIP_256=1: leave out the 256-client run;
#        ENGINE_PROCESS=1: the engine in a process of its own, --args.engine-process=true)
set -u
PORT=${1:-8177}
LOG=${OUT:-/tmp}/served_8b_server.log
python3 -m ad_cli.serve --port "$PORT" --args.model=/tmp/gpumodels/llama-3.1-8b --args.skip-loading-weights=true \
  --args.dtype=bfloat16 --args.max-batch-size=256 --args.max-num-tokens=8192 --args.max-seq-len=2048 \
  --args.enable-chunked-prefill=true --args.engine-process="$([ "${ENGINE_PROCESS:-0}" = 1 ] && echo true || echo false)" \
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
$B --num-prompts 16 --concurrency 1 --input-len 128 --output-len 16 --warmup 2 --seed 11
