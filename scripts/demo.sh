#!/usr/bin/env bash
# Sets up, builds ropekit, and runs its main job on a bundled example: explains the RoPE of the
# Llama-3.1-8B config (rope type, per-pair frequencies and wavelengths, what the scaling did),
# then rotates a random [tokens, heads, head_dim] tensor at long, shuffled positions and checks
# the result against a float64 evaluation of the same formula.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DROPEKIT_PYTHON=/usr/bin/python3 >/dev/null
cmake --build build/release -j"$(nproc)" --target ropekit_cli >/dev/null
cli=build/release/tools/ropekit
config=examples/llama-3.1-8b.json
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== ropekit inspect $config"
"$cli" inspect "$config"

echo
echo "== ropekit apply: 6 tokens x 4 heads x 128 channels at positions up to 131101"
/usr/bin/python3 - "$out" <<'PY'
import sys, numpy as np
out = sys.argv[1]
rng = np.random.default_rng(0)
np.save(f"{out}/x.npy", rng.standard_normal((6, 4, 128)).astype(np.float32))
np.save(f"{out}/pos.npy", np.array([131101, 0, 7, 4097, 32771, 8191], dtype=np.int64))
PY
"$cli" apply --config "$config" --input "$out/x.npy" --positions "$out/pos.npy" --output "$out/y.npy"
"$cli" inspect "$config" --json > "$out/inspect.json"
/usr/bin/python3 - "$out" <<'PY'
import json, sys, numpy as np
out = sys.argv[1]
x, p, y = (np.load(f"{out}/{n}.npy") for n in ("x", "pos", "y"))
info = json.load(open(f"{out}/inspect.json"))
w = np.array(info["inv_freq"], dtype=np.float64)
n = w.size
ang = p[:, None].astype(np.float64) * w[None, :]
c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
a, b = x[..., :n].astype(np.float64), x[..., n:2 * n].astype(np.float64)
ref = np.concatenate([a * c - b * s, b * c + a * s, x[..., 2 * n:]], axis=-1)
print(f"rotated {x.shape} float32 with rope_type={info['rope_type']}, layout={info['layout']}")
print(f"max |ropekit - float64 formula| = {np.abs(y - ref).max():.2e}  (float32 rounding level)")
print(f"norms preserved: max |(|y| - |x|)| / |x| = "
      f"{np.abs(np.linalg.norm(y, axis=-1) / np.linalg.norm(x, axis=-1) - 1).max():.1e}")
PY
