#!/usr/bin/env bash
# Runs the model benchmark of ropekit and the same model in PyTorch, at the same thread count,
# one after the other in the same run. Usage: bench/run_model_bench.sh [BUILD_DIR] [THREADS...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
shift || true
threads=("${@:-1}")
for t in "${threads[@]}"; do
  OPENBLAS_NUM_THREADS=1 "${build}/bench/bench_model" --threads "${t}" --steps 10 --decode 256
  /usr/bin/python3 bench/bench_model_torch.py --threads "${t}" --steps 10 --decode 256
done
