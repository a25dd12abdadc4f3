#!/usr/bin/env bash
# Sets up, builds ropekit, and runs its main job: the length-extrapolation study (train short,
# test long, extend the context) on Jane Austen's novels from Debian's r-cran-janeaustenr.
# Arguments go to `ropekit study` (default: --preset quick --threads <cores>, about 10 minutes on
# 2 cores); results, checkpoints and report.html land in study/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DROPEKIT_PYTHON=/usr/bin/python3 >/dev/null
cmake --build build/release -j"$(nproc)" --target ropekit_cli >/dev/null
if [ $# -eq 0 ]; then set -- --preset quick --threads "$(nproc)"; fi
exec build/release/tools/ropekit study "$@"
