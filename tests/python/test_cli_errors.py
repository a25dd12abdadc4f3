"""Black-box tests of `ropekit apply` on bad input.

Every case must: exit with a non-zero status, print exactly one line on stderr that starts with
`ropekit: error:` and names the problem, print nothing on stdout, and leave the output directory
exactly as it was (no output, no partial or temporary file; a pre-existing output file keeps its
bytes).
"""

import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError(
        "ROPEKIT_CLI is not set: point it at the built `ropekit` binary "
        "(ctest sets it; by hand: ROPEKIT_CLI=build/release/tools/ropekit pytest tests/python)")
if not os.access(CLI, os.X_OK):
    raise RuntimeError(f"ROPEKIT_CLI={CLI!r} is not an executable file")

GOOD_CONFIG = {
    "model_type": "llama",
    "hidden_size": 512,
    "num_attention_heads": 4,
    "head_dim": 128,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,  # rotary dim 64
    "max_position_embeddings": 4096,
}
T, H, D = 5, 2, 128
SENTINEL = b"pre-existing output, must survive a failed run"


def _save(path, array):
    with open(path, "wb") as f:
        np.save(f, array)


class Workspace:
    """Inputs in `in_dir`, output path in `out_dir` (holding only a sentinel y_old.npy)."""

    def __init__(self, root):
        self.in_dir = os.path.join(root, "in")
        self.out_dir = os.path.join(root, "out")
        os.mkdir(self.in_dir)
        os.mkdir(self.out_dir)
        self.config = os.path.join(self.in_dir, "config.json")
        self.x = os.path.join(self.in_dir, "x.npy")
        self.p = os.path.join(self.in_dir, "p.npy")
        self.y = os.path.join(self.out_dir, "y.npy")
        self.old = os.path.join(self.out_dir, "y_old.npy")
        with open(self.config, "w") as f:
            json.dump(GOOD_CONFIG, f)
        rng = np.random.default_rng(0)
        _save(self.x, rng.standard_normal((T, H, D)).astype(np.float32))
        _save(self.p, np.array([3, 0, 4097, 1, 7], np.int64))
        with open(self.old, "wb") as f:
            f.write(SENTINEL)

    def args(self, **override):
        opts = {"config": self.config, "input": self.x, "positions": self.p, "output": self.y}
        opts.update(override)
        out = [CLI, "apply"]
        for key, value in opts.items():
            if value is not None:
                out += ["--" + key.replace("_", "-"), str(value)]
        return out


def run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def expect_failure(ws, args, *needles, out_dir_entries=("y_old.npy",)):
    proc = run(args)
    assert proc.returncode != 0, f"{args} succeeded"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {proc.stderr!r}"
    assert lines[0].startswith("ropekit: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert proc.stdout == "", proc.stdout
    assert sorted(os.listdir(ws.out_dir)) == sorted(out_dir_entries), os.listdir(ws.out_dir)
    with open(ws.old, "rb") as f:
        assert f.read() == SENTINEL
    return lines[0]


@pytest.fixture
def ws():
    with tempfile.TemporaryDirectory() as root:
        yield Workspace(root)


def test_good_run_succeeds(ws):
    # The baseline all other cases deviate from.
    proc = run(ws.args())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert sorted(os.listdir(ws.out_dir)) == ["y.npy", "y_old.npy"]
    # Writing over an existing output replaces it without leaving anything else behind.
    proc = run(ws.args(output=ws.old))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(ws.out_dir)) == ["y.npy", "y_old.npy"]
    assert np.load(ws.old).shape == (T, H, D)


# --- files that cannot be read ----------------------------------------------------------------


def test_missing_files(ws):
    missing = os.path.join(ws.in_dir, "absent.npy")
    expect_failure(ws, ws.args(input=missing), missing)
    expect_failure(ws, ws.args(positions=missing), missing)
    missing_cfg = os.path.join(ws.in_dir, "absent.json")
    expect_failure(ws, ws.args(config=missing_cfg), missing_cfg)


def test_directory_as_input(ws):
    expect_failure(ws, ws.args(input=ws.in_dir), ws.in_dir, "directory")
    expect_failure(ws, ws.args(positions=ws.in_dir), ws.in_dir, "directory")
    expect_failure(ws, ws.args(config=ws.in_dir), ws.in_dir)


def test_truncated_npy(ws):
    with open(ws.x, "rb") as f:
        data = f.read()
    for cut in (5, 60, len(data) - 1):
        with open(ws.x, "wb") as f:
            f.write(data[:cut])
        expect_failure(ws, ws.args(), ws.x)


def test_not_an_npy_file(ws):
    with open(ws.x, "w") as f:
        f.write("this is text, not an array\n")
    expect_failure(ws, ws.args(), ws.x, "magic")


# --- configs ----------------------------------------------------------------------------------


def test_json_syntax_error(ws):
    with open(ws.config, "w") as f:
        f.write('{"rope_theta": 10000.0, "head_dim": 128,')
    expect_failure(ws, ws.args(), ws.config)


def test_unknown_rope_type(ws):
    cfg = dict(GOOD_CONFIG, rope_scaling={"rope_type": "spiral", "factor": 2.0})
    with open(ws.config, "w") as f:
        json.dump(cfg, f)
    expect_failure(ws, ws.args(), "spiral")


# --- tensor checks ----------------------------------------------------------------------------


def test_input_dtype(ws):
    for dtype in (np.float64, np.int32, np.int64):
        _save(ws.x, np.zeros((T, H, D), dtype))
        expect_failure(ws, ws.args(), "--input", np.dtype(dtype).name, "float32", "float16")


def test_input_ndim(ws):
    for shape in ((T, D), (T, H, 1, D), (), (D,)):
        _save(ws.x, np.zeros(shape, np.float32))
        expect_failure(ws, ws.args(), "--input", "3 dimensions")


def test_head_dim_smaller_than_rotary_dim(ws):
    _save(ws.x, np.zeros((T, H, 32), np.float32))
    expect_failure(ws, ws.args(), "--input", "head_dim 32", "rotary dimension 64")


def test_head_dim_not_matching_config(ws):
    _save(ws.x, np.zeros((T, H, 96), np.float16))
    expect_failure(ws, ws.args(), "--input", "head_dim 96", "128")


def test_fortran_order_input(ws):
    _save(ws.x, np.asfortranarray(np.zeros((T, H, D), np.float32)))
    expect_failure(ws, ws.args(), ws.x, "Fortran")


def test_positions_length(ws):
    for n in (T - 1, T + 1, 0):
        _save(ws.p, np.arange(n, dtype=np.int64))
        expect_failure(ws, ws.args(), "--positions", f"has {n} entries", f"T = {T}")


def test_positions_range(ws):
    for bad, dtype in ((-1, np.int64), (-5, np.int32), (2**31, np.int64), (2**40, np.int64)):
        _save(ws.p, np.array([0, 1, bad, 2, 3], dtype))
        expect_failure(ws, ws.args(), "--positions", "entry 2", str(bad), "2147483647")
    # The largest valid position is accepted.
    _save(ws.p, np.array([0, 1, 2**31 - 1, 2, 3], np.int64))
    proc = run(ws.args())
    assert proc.returncode == 0, proc.stderr


def test_positions_dtype_and_shape(ws):
    for dtype in (np.float32, np.float64, np.float16):
        _save(ws.p, np.arange(T).astype(dtype))
        expect_failure(ws, ws.args(), "--positions", np.dtype(dtype).name, "int32", "int64")
    _save(ws.p, np.arange(T, dtype=np.int64).reshape(T, 1))
    expect_failure(ws, ws.args(), "--positions", "1-d")


# --- output path ------------------------------------------------------------------------------


def test_directory_as_output(ws):
    sub = os.path.join(ws.out_dir, "sub")
    os.mkdir(sub)
    expect_failure(ws, ws.args(output=sub), sub, "directory",
                   out_dir_entries=("sub", "y_old.npy"))
    assert os.listdir(sub) == []


def test_output_directory_missing(ws):
    target = os.path.join(ws.out_dir, "missing", "y.npy")
    expect_failure(ws, ws.args(output=target), target)


def test_non_writable_output_directory(ws):
    if os.geteuid() == 0:
        # Permission bits do not stop root; procfs refuses new files for everyone.
        locked = "/proc"
    else:
        locked = os.path.join(ws.out_dir, "locked")
        os.mkdir(locked)
        os.chmod(locked, 0o555)
    target = os.path.join(locked, "ropekit_test_output.npy")
    entries = ("locked", "y_old.npy") if locked != "/proc" else ("y_old.npy",)
    expect_failure(ws, ws.args(output=target), target, out_dir_entries=entries)
    assert not os.path.exists(target)
    if locked != "/proc":
        assert os.listdir(locked) == []


# --- options ----------------------------------------------------------------------------------


def test_bad_option_values(ws):
    expect_failure(ws, ws.args() + ["--layout", "diagonal"], "diagonal")
    expect_failure(ws, ws.args() + ["--numerics", "approximate"], "approximate")
    expect_failure(ws, ws.args() + ["--threads", "-1"], "--threads")
    expect_failure(ws, ws.args() + ["--seq-len", "0"], "--seq-len")


# --- help -------------------------------------------------------------------------------------


def test_help():
    proc = run([CLI, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "apply" in proc.stdout
    proc = run([CLI, "apply", "--help"])
    assert proc.returncode == 0, proc.stderr
    for option in ("--config", "--input", "--positions", "--output", "--layout", "--numerics",
                   "--seq-len", "--backward", "--threads", "--layer-type", "max(P)+1"):
        assert option in proc.stdout, option


def test_usage_errors(ws):
    expect_failure(ws, ws.args(output=None), "--output", "required")
    expect_failure(ws, ws.args() + ["--seq-len", "many"], "--seq-len")
    expect_failure(ws, ws.args() + ["--no-such-option"], "--no-such-option")
    expect_failure(ws, [CLI], "subcommand")
    expect_failure(ws, [CLI, "rotate"], "subcommand")
