#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan, ROPEKIT_FUZZ=ON) in build/fuzz and runs each
# for SECONDS (default 60) on a scratch copy of its seed corpus in fuzz/corpus/<target>/, two at
# a time. Prints the executions of each target; exits non-zero if any input crashed, leaked or
# tripped a sanitizer (the reproducer is left in build/fuzz/artifacts/).
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
targets=(fuzz_npy fuzz_hf_config fuzz_safetensors fuzz_model_config fuzz_trainer_state)
cmake -S . -B build/fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DROPEKIT_FUZZ=ON -DROPEKIT_BUILD_TESTS=OFF -DROPEKIT_BUILD_BENCH=OFF \
  -DROPEKIT_BUILD_PYTHON=OFF >/dev/null
cmake --build build/fuzz -j"$(nproc)" --target "${targets[@]}"
rm -rf build/fuzz/corpora build/fuzz/artifacts
mkdir -p build/fuzz/artifacts
run_one() {
  local t=$1 work=build/fuzz/corpora/$1
  mkdir -p "$work"
  cp fuzz/corpus/"$t"/* "$work"/
  # -rss_limit_mb: every reader bounds its allocations far below this.
  if ! build/fuzz/fuzz/"$t" -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix=build/fuzz/artifacts/"$t"- "$work" >build/fuzz/"$t".log 2>&1; then
    echo "=== $t FAILED (log: build/fuzz/$t.log)"
    tail -40 build/fuzz/"$t".log
    return 1
  fi
  local runs
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' build/fuzz/"$t".log | grep -o '[0-9]*$')
  echo "$t: ${runs} executions in ${seconds} s, no crash ($(ls "$work" | wc -l) corpus files)"
}
status=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  pids=()
  for t in "${targets[@]:i:2}"; do
    run_one "$t" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=1; done
done
exit $status
