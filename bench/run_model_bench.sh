#!/usr/bin/env bash
# Runs the model benchmark of ropekit and the same model in PyTorch eager, at the same thread
# count, one after the other in the same run, and prints the ratio of training tokens/s.
# Usage: bench/run_model_bench.sh [BUILD_DIR] [THREADS...]
# Environment: SIZES="default large" (model shapes), STEPS=10, REPEATS=3, DECODE=256,
# EXTRA="--bf16" (extra bench_model options).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
shift || true
threads=("${@:-1}")
sizes=(${SIZES:-default})
steps=${STEPS:-10}
repeats=${REPEATS:-3}
decode=${DECODE:-256}
echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p')"
for size in "${sizes[@]}"; do
  for t in "${threads[@]}"; do
    ours=$(OPENBLAS_NUM_THREADS=1 "${build}/bench/bench_model" --threads "${t}" --steps "${steps}" \
      --repeats "${repeats}" --decode "${decode}" --size "${size}" ${EXTRA:-} | grep -v '^#')
    torch=$(/usr/bin/python3 bench/bench_model_torch.py --threads "${t}" --steps "${steps}" \
      --repeats "${repeats}" --decode "${decode}" --size "${size}")
    echo "${ours}"
    echo "${torch}"
    /usr/bin/python3 -c 'import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]);
print("ratio size=%s threads=%s: train %.2fx torch, decode %.2fx torch" % (a["size"], a["threads"],
a["train_tokens_per_s"] / b["train_tokens_per_s"], a["decode_tokens_per_s"] / b["decode_tokens_per_s"]))' \
      "${ours}" "${torch}"
  done
done
