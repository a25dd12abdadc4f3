#!/usr/bin/env bash
# pip install . into a fresh virtual environment that sees Debian's numpy
# (--system-site-packages), without build isolation (no package index is needed), then imports
# the installed module from outside the source tree and checks one rotation against numpy.
# Usage: pip_test.sh PYTHON SOURCE_DIR WORK_DIR
set -euo pipefail
python=$1 source=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
"$python" -m venv --system-site-packages "$work/venv"
# pip builds a local directory in place; build from a copy so the source tree stays untouched.
# Only the project's own files: no build trees, no installed test clients (another test may be
# writing tests/clients/node_modules meanwhile).
tar -C "$source" --exclude='./build*' --exclude=./.git --exclude=node_modules \
  -cf - . | (mkdir "$work/src" && tar -C "$work/src" -xf -)
"$work/venv/bin/pip" install --quiet --no-build-isolation --no-index "$work/src"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import math
import sys

import numpy as np
import ropekit

assert ropekit.__file__.startswith(sys.prefix), ropekit.__file__
# RoFormer, half-split layout: x'_i = x_i cos(p w_i) - x_{i+4} sin(p w_i), w_i = 10000^(-i/4).
# float32 storage and cos/sin: errors of a few ulps of |x| <= 1, so 1e-5 is a safe margin.
config = ropekit.RopeConfig(head_dim=8)
x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 1, 8)
p = 5
y = ropekit.apply_rope(x, np.array([p]), config)
expected = np.empty(8)
for i in range(4):
    a, b, t = float(x[0, 0, i]), float(x[0, 0, i + 4]), p * 10000.0 ** (-i / 4)
    expected[i] = a * math.cos(t) - b * math.sin(t)
    expected[i + 4] = b * math.cos(t) + a * math.sin(t)
err = float(np.abs(y[0, 0] - expected).max())
print(f"pip: ropekit {ropekit.__version__} from {ropekit.__file__}, max error {err:.3g}")
sys.exit(0 if err < 1e-5 else 1)
PY
