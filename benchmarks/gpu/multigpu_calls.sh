#!/usr/bin/env bash
# The multi-GPU runs of issues 4 and 6 on a 4-GPU machine, in two calls on the same warm machine (the bundled
# GGUF travels in two pieces). Usage, after `source benchmarks/gpu/setup.sh`: multigpu_calls.sh 1|2
# Call 1 (carry .whl .gpu .gguf_a): sharding tests on GPUs 0,1 while spec command 2 (world size 2) and the strict
#   export command run on GPUs 2,3; then the first YAML command (world size 4).
# Call 2 (carry .gguf_b): the SmolLM2 real-weight sharding and LLM(world_size=2) tests, then the nested YAML command.
set -u
T=tests/ad_compiler/sharding/test_multigpu.py
t0=$(date +%s)
case "$1" in
1)
  (CUDA_VISIBLE_DEVICES=0,1 timeout 420 python3 -m pytest -m multigpu $T -q -p no:cacheprovider \
     -k "not smollm2 and not llm" > "$OUT/mg1.log" 2>&1; echo "pytest exit $?" >> "$OUT/mg1.log") &
  (export CUDA_VISIBLE_DEVICES=2,3; timeout 420 bash benchmarks/gpu/spec_commands.sh 2 multi cli2 > "$OUT/spec_a.log" 2>&1
   CUDA_VISIBLE_DEVICES=2 timeout 240 bash benchmarks/gpu/spec_commands.sh 1 single strict >> "$OUT/spec_a.log" 2>&1) &
  wait
  cat "$OUT/spec_a.log"; tail -n 25 "$OUT/mg1.log"
  echo "=== parallel part took $(( $(date +%s) - t0 ))s"
  timeout $(( 570 - ($(date +%s) - t0) )) bash benchmarks/gpu/spec_commands.sh 4 multi yaml1
  ;;
2)
  timeout 330 python3 -m pytest -m multigpu $T -q -p no:cacheprovider -k "smollm2 or llm" > "$OUT/mg2.log" 2>&1
  echo "pytest exit $?" >> "$OUT/mg2.log"; tail -n 25 "$OUT/mg2.log"
  timeout $(( 570 - ($(date +%s) - t0) )) bash benchmarks/gpu/spec_commands.sh 4 multi yaml_nested
  ;;
esac
echo "=== call $1 took $(( $(date +%s) - t0 ))s"
