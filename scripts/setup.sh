#!/usr/bin/env bash
# Installs every build and test dependency of ropekit from Debian packages. Idempotent.
set -euo pipefail
pkgs=(
  build-essential cmake g++ clang-format
  libhwy-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev libopenblas-dev zlib1g-dev
  libopenmpi-dev openmpi-bin
  chromium
  python3 python3-dev python3-numpy python3-pytest python3-mpmath python3-torch pybind11-dev
)
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
