#!/usr/bin/env bash
# Installs ropekit's build and test dependencies from Debian packages. Idempotent.
#   scripts/setup.sh                 everything (the default build, its tests and benchmarks)
#   scripts/setup.sh core            only what ropekit::core needs (-DROPEKIT_BUILD_MODEL=OFF)
#   scripts/setup.sh core python     core plus the Python module (pip install .)
# Parts: core, model, tools, python, tests, bench, all.
set -euo pipefail

declare -A part_pkgs=(
  [core]="build-essential cmake g++ libhwy-dev nlohmann-json3-dev"
  [model]="libopenblas-dev zlib1g-dev"
  [tools]="libcli11-dev"
  [server]="libcpp-httplib-dev"
  [mpi]="libopenmpi-dev openmpi-bin"
  [python]="python3 python3-dev python3-numpy python3-venv python3-setuptools python3-pip pybind11-dev"
  [tests]="libgtest-dev libgmock-dev python3-pytest python3-mpmath python3-torch chromium clang-format nodejs"
  [bench]="libbenchmark-dev"
)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(all)
pkgs=()
for part in "${parts[@]}"; do
  if [ "$part" = all ]; then
    for p in "${!part_pkgs[@]}"; do pkgs+=(${part_pkgs[$p]}); done
  elif [ -n "${part_pkgs[$part]:-}" ]; then
    pkgs+=(${part_pkgs[$part]})
  else
    echo "setup: unknown part '$part' (accepted: ${!part_pkgs[*]} all)" >&2
    exit 2
  fi
done

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# npm (for the JavaScript client tests of `ropekit serve`): Debian's package, unless the nodejs
# already installed ships its own npm.
if ! command -v npm >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends npm
fi
