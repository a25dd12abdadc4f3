#!/usr/bin/env bash
# Trains the default model twice from the same seed and data, in float32 and with --bf16, one
# after the other in the same run, and compares speed and loss curves: training tokens/s of each
# (wall time of the whole run, median over REPEATS short runs by bench_model) and the per-step
# training loss of the two STEPS-step runs (max and mean |bf16 - fp32| per step, the difference of
# the mean loss over the last 50 steps, and the final validation loss of each).
# Usage: bench/run_bf16_train.sh [BUILD_DIR] [CORPUS_DIR]
#   CORPUS_DIR holds the Austen novels of scripts/get_corpus.sh (default data/austen).
# Environment: STEPS=300, THREADS=1, REPEATS=5 (speed runs of 5 steps each).
# Exits 1 when the curves are further apart than the tolerance: 0.05 in any step's loss, or 0.01
# in the mean loss of the last 50 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
corpus=${2:-data/austen}
steps=${STEPS:-300}
threads=${THREADS:-1}
repeats=${REPEATS:-5}
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p')"
"${build}/tools/ropekit" train --help | sed -n 's/^.*Here: /# /p'
for p in fp32 bf16; do
  flag=$([[ ${p} == bf16 ]] && echo --bf16 || true)
  OPENBLAS_NUM_THREADS=1 "${build}/bench/bench_model" --threads "${threads}" --steps 5 \
    --repeats "${repeats}" --decode 0 ${flag} | grep -v '^#' >"${work}/speed_${p}.json"
done
for p in fp32 bf16; do
  flag=$([[ ${p} == bf16 ]] && echo --bf16 || true)
  OPENBLAS_NUM_THREADS=1 "${build}/tools/ropekit" train --quiet --threads "${threads}" \
    --corpus "${corpus}/emma.txt" "${corpus}/mansfield_park.txt" "${corpus}/northanger_abbey.txt" \
    "${corpus}/pride_and_prejudice.txt" "${corpus}/sense_and_sensibility.txt" \
    --val-corpus "${corpus}/persuasion.txt" --eval-interval "${steps}" --log-interval 1 \
    --steps "${steps}" --seq-len 128 --batch-size 16 --out "${work}/ckpt_${p}" \
    --log "${work}/${p}.jsonl" ${flag} >/dev/null
done
/usr/bin/python3 - "${work}" <<'EOF'
import json, statistics, sys
w = sys.argv[1]
speed = {p: json.load(open(f"{w}/speed_{p}.json")) for p in ("fp32", "bf16")}
logs = {p: [json.loads(l) for l in open(f"{w}/{p}.jsonl")] for p in ("fp32", "bf16")}
a, b = logs["fp32"], logs["bf16"]
assert [e["step"] for e in a] == [e["step"] for e in b]
d = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
last = lambda l: statistics.mean(e["loss"] for e in l[-50:])
val = lambda l: [e["val_loss"] for e in l if "val_loss" in e][-1]
fs, bs = speed["fp32"]["train_tokens_per_s"], speed["bf16"]["train_tokens_per_s"]
print(f"train tokens/s: fp32 {fs:.0f}, bf16 {bs:.0f}, bf16 / fp32 = {bs / fs:.2f}x")
print(f"loss over {len(a)} steps: max |bf16 - fp32| {max(d):.4f}, mean {statistics.mean(d):.4f}")
print(f"mean loss of the last 50 steps: fp32 {last(a):.4f}, bf16 {last(b):.4f}, "
      f"difference {last(b) - last(a):+.4f}")
print(f"final validation loss: fp32 {val(a):.4f}, bf16 {val(b):.4f}")
ok = max(d) <= 0.05 and abs(last(b) - last(a)) <= 0.01
print("within tolerance (0.05 per step, 0.01 on the last-50 mean):", "yes" if ok else "NO")
sys.exit(0 if ok else 1)
EOF
