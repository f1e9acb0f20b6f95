#!/usr/bin/env bash
# Every build_and_run_ad command of the spec page, with hub models swapped for random-weight stand-ins
# of the same family (benchmarks/gpu/make_models.py).
# Usage: spec_commands.sh GPUS_AVAILABLE [single|multi|all [NAME]]  (NAME runs that one command only)
set -u
M=/tmp/gpumodels
G=benchmarks/gpu
ngpu=${1:-1}
only=${3:-}
run() {  # name, gpus needed, args...
  local name=$1 need=$2; shift 2
  if [ -n "$only" ] && [ "$name" != "$only" ]; then return; fi
  if [ "$need" -gt "$ngpu" ]; then echo "=== $name: SKIPPED (needs $need GPUs, have $ngpu)"; return; fi
  echo "=== $name: build_and_run_ad $*"
  local t0=$(date +%s)
  python3 -m ad_cli.build_and_run_ad "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "--- $name: exit $rc in $(( $(date +%s) - t0 ))s"; tail -n 12 "$OUT/$name.log"
}
W="--args.skip-loading-weights=true"
case "${2:-all}" in
  single|all)
run cli1 1 --model $M/llama-3.1-8b --args.model-kwargs.num-hidden-layers=10 --args.model-kwargs.hidden-size=2048 --args.tokenizer-kwargs.padding-side=left $W
run cli3 1 --model $M/phi-4 --prompt.batch-size=4 --prompt.sp-kwargs.max-tokens=200 --prompt.sp-kwargs.temperature=0.7 --benchmark.enabled=true --benchmark.bs=8 --benchmark.isl=1024 $W
run strict 1 --model $M/tinyllama-1.1b --args.transforms.export-to-gm.strict=true $W
;;&
  multi|all)
run cli2 2 --model $M/tinyllama-1.1b --args.world-size=2 --args.compile-backend=torch-opt --args.attn-backend=flashinfer $W
run yaml1 4 --model $M/llama-3.1-8b --yaml-extra $G/my_config.yaml $W
run yaml_nested 4 --model $M/llama-3.1-8b --yaml-extra $G/my_config.yaml --args.yaml-extra $G/autodeploy_overrides.yaml $W
run yaml2 8 --model $M/llama-3.1-8b --yaml-extra $G/my_config.yaml $G/production.yaml $W
;;
esac
