#!/usr/bin/env bash
# Sets up the dependencies, then builds and runs every test three times, then fuzzes:
#   release  - optimised build, SIMD with runtime dispatch, C++ and Python tests, packaging
#              (an out-of-tree find_package(ropekit) consumer, pip install into a venv)
#   asan     - AddressSanitizer + UndefinedBehaviorSanitizer, C++ tests and the command line
#   scalar   - Highway compiled for its portable SCALAR target only, C++ and Python tests
#              (not the npm client, MPI or fault-injection tests, which do not depend on the
#              SIMD target)
#   fuzz     - clang libFuzzer targets of the file readers (ASan + UBSan), 60 s each, two at a
#              time (scripts/fuzz.sh; run it with more seconds for longer campaigns)
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=$(nproc)

build_and_test() {
  local name=$1 exclude=$2
  shift 2
  echo "=== ropekit: ${name} build"
  cmake -S . -B "build/${name}" -DROPEKIT_PYTHON=/usr/bin/python3 "$@" >/dev/null
  cmake --build "build/${name}" -j"${jobs}"
  echo "=== ropekit: ${name} tests"
  ctest --test-dir "build/${name}" --output-on-failure -j"${jobs}" ${exclude:+-LE "${exclude}"}
}

build_and_test release "" -DCMAKE_BUILD_TYPE=Release
build_and_test asan "python|package" -DCMAKE_BUILD_TYPE=Debug -DROPEKIT_SANITIZE=ON \
  -DROPEKIT_BUILD_PYTHON=OFF -DROPEKIT_BUILD_BENCH=OFF
build_and_test scalar "package|npm|mpi|faults" -DCMAKE_BUILD_TYPE=Release -DROPEKIT_SCALAR_ONLY=ON \
  -DROPEKIT_BUILD_BENCH=OFF
echo "=== ropekit: fuzz (libFuzzer, 60 s per target)"
scripts/fuzz.sh 60
echo "=== ropekit: all test configurations passed"
