#!/usr/bin/env bash
# A/B of the working tree against an older commit in one device call, processes alternating on one machine.
#   here:        bash benchmarks/gpu/ab_commit.sh prepare REV       (git archive of REV's packages and benchmarks
#                                                                    into .gpu/ab/REV, which the call carries)
#   the device:  source benchmarks/gpu/setup.sh; bash benchmarks/gpu/ab_commit.sh run REV ROUNDS SCRIPT ARGS...
# `run` alternates new, old, new, old... ROUNDS times each: benchmarks/gpu/SCRIPT ARGS from the working tree, then
# the same from REV's archive with REV's packages on PYTHONPATH, logs in $OUT/ab_{new,old}_<round>.log, and prints
# each log's summary lines. Compare only within one call: machines differ by more than most changes (README,
# eleventh session: the GEMV load-order regression was seen only this way, 4.78 against 4.26 ms, same machine).
# Each side has its own build-cache entries (the key holds a digest of the packages' source).
set -euo pipefail
cmd=${1:?prepare or run}; rev=${2:?a commit}
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
cd "$root"
dir=.gpu/ab/$rev
if [ "$cmd" = prepare ]; then
  rm -rf "$dir" && mkdir -p "$dir"
  git archive "$rev" packages benchmarks | tar -x -C "$dir"
  du -sh "$dir"
  exit 0
fi
rounds=${3:?rounds}; script=${4:?a benchmarks/gpu script, e.g. decode_profile.py}; shift 4
[ -d "$dir/packages" ] || { echo "no $dir: run 'ab_commit.sh prepare $rev' here before the call"; exit 2; }
old_path=/tmp/site:$(ls -d "$PWD/$dir"/packages/*/src | paste -sd:)
summary() { grep -h "build: \|decode step\|replayed alone\|host ms\|tok/s" "$1" | cut -c1-230 || true; }
for i in $(seq 1 "$rounds"); do
  python3 "benchmarks/gpu/$script" "$@" > "$OUT/ab_new_$i.log" 2>&1 || echo "new round $i: rc=$?"
  echo "== new (the working tree carried to the device), round $i"; summary "$OUT/ab_new_$i.log"
  (cd "$dir" && PYTHONPATH=$old_path python3 "benchmarks/gpu/$script" "$@") > "$OUT/ab_old_$i.log" 2>&1 \
    || echo "old round $i: rc=$?"
  echo "== old ($rev), round $i"; summary "$OUT/ab_old_$i.log"
done
