"""`ropekit inspect` and `ropekit apply` on the bundled multimodal (M-RoPE) configs.

The rotated output is compared with an independent float64 evaluation written here from
transformers' `apply_multimodal_rotary_pos_emb` semantics (pair i < 16 follows the temporal
position, 16 <= i < 40 the height, 40 <= i < 64 the width, for mrope_section [16, 24, 24]).
Tolerance: float32 kernel with cos/sin rounded once: |err| <= 3 * 2^-24 (|x_a| + |x_b|).
"""

import json
import os
import subprocess
import tempfile

import numpy as np

CLI = os.environ.get("ROPEKIT_CLI")
SRC = os.environ.get("ROPEKIT_SOURCE_DIR")
if not CLI or not SRC:
    raise RuntimeError("ROPEKIT_CLI and ROPEKIT_SOURCE_DIR must be set (ctest sets them)")
QWEN2 = os.path.join(SRC, "examples", "qwen2-vl-7b.json")
QWEN3 = os.path.join(SRC, "examples", "qwen3-vl-8b.json")


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True)


def test_inspect_shows_the_axis_of_every_pair():
    out = run("inspect", QWEN2)
    assert out.returncode == 0, out.stderr
    assert "position axes:            3, M-RoPE chunked [16, 24, 24] (positions [3, T])" in out.stdout
    assert "0-15 temporal, 16-39 height, 40-63 width" in out.stdout
    j = json.loads(run("inspect", QWEN3, "--json").stdout)
    assert j["mrope_section"] == [24, 20, 20] and j["mrope_interleaved"] is True
    assert j["pair_axis"] == [i % 3 if i < 60 else 0 for i in range(64)]
    assert j["base"] == 5000000 and j["head_dim"] == 128


def test_apply_takes_three_axis_positions_and_rejects_the_other_shape():
    rng = np.random.default_rng(3)
    T, H, D = 6, 2, 128
    x = rng.standard_normal((T, H, D), dtype=np.float32)
    pos = np.array([[0, 1, 2, 2, 2, 5], [0, 1, 2, 3, 3, 5], [0, 1, 2, 3, 4, 5]], dtype=np.int64)
    with tempfile.TemporaryDirectory() as d:
        xp, pp, yp = (os.path.join(d, n) for n in ("x.npy", "p.npy", "y.npy"))
        np.save(xp, x)
        np.save(pp, pos)
        out = run("apply", "--config", QWEN2, "--input", xp, "--positions", pp, "--output", yp)
        assert out.returncode == 0, out.stderr
        y = np.load(yp).astype(np.float64)
        inv = 1.0 / (1e6 ** (np.arange(0, D, 2, dtype=np.float64) / D))
        axis = np.array([0] * 16 + [1] * 24 + [2] * 24)
        theta = pos[axis, :].T.astype(np.float64) * inv[None, :]  # [T, 64]
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        a, b = x[..., :64].astype(np.float64), x[..., 64:].astype(np.float64)
        want = np.concatenate((a * c - b * s, b * c + a * s), axis=-1)
        r = np.abs(a) + np.abs(b)
        tol = 3 * 2.0**-24 * np.concatenate((r, r), axis=-1) * 1.01
        assert np.all(np.abs(y - want) <= tol)
        # A [T] positions file for this config, and a [3, T] file for a text config.
        np.save(pp, pos[0])
        os.remove(yp)
        out = run("apply", "--config", QWEN2, "--input", xp, "--positions", pp, "--output", yp)
        assert out.returncode != 0
        assert "expected shape [A, T] = [3, 6]" in out.stderr and "got [6]" in out.stderr
        assert not os.path.exists(yp)
        text = os.path.join(SRC, "examples", "mistral-7b.json")
        np.save(pp, pos)
        out = run("apply", "--config", text, "--input", xp, "--positions", pp, "--output", yp)
        assert out.returncode != 0
        assert "shape [T] = [6]" in out.stderr and "got [3, 6]" in out.stderr
