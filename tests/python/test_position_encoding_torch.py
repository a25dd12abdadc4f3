"""The position encodings of `ropekit pe` against independent PyTorch implementations.

Each oracle below is written from the papers' formulas (float64 unless the original model works
in float32, as T5's bucketing does), not from ropekit's code. The command line writes .npy files
that are compared with them. Gradients of the hooks are checked against finite differences in
tests/position_encoding_test.cc (the command line exposes the tables, not the hooks); the
autograd test here checks the additive-bias gradient structure the C++ backward implements.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI must name the built ropekit binary")

F32_HALF_ULP_1 = 2.0**-25  # half an ulp of float32 at values in [0.5, 1)


def run(*args, check=True):
    proc = subprocess.run([CLI, "pe", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"ropekit pe {args} failed: {proc.stderr}")
    return proc


def table(tmp_path, *args):
    out = tmp_path / "out.npy"
    run(*args, "--output", out)
    return np.load(out)


# ---------------------------------------------------------------------------------------------
# Oracles.


def torch_sinusoidal(seq_len, dim, base):
    """Vaswani et al. 2017, sec. 3.5: P[k, 2i] = sin(k / n^(2i/d)), P[k, 2i+1] = cos(...);
    the last column of an odd d has no pair and is 0."""
    k = torch.arange(seq_len, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None, :]
    angle = k / torch.pow(torch.tensor(base, dtype=torch.float64), 2 * i / dim)
    out = torch.zeros(seq_len, dim, dtype=torch.float64)
    out[:, 0 : 2 * (dim // 2) : 2] = torch.sin(angle)
    out[:, 1 : 2 * (dim // 2) : 2] = torch.cos(angle)
    return out, angle


def alibi_slopes(heads):
    """Press et al. 2022, sec. 3 and footnote: for a power of two H the slopes are the geometric
    sequence starting at 2^(-8/H) with that ratio; otherwise take the 2^floor(log2 H) sequence and
    append every other slope of the sequence for twice that count."""

    def geometric(n):
        first = 2.0 ** (-8.0 / n)
        return [first * first**h for h in range(n)]

    p = 1 << (heads.bit_length() - 1)
    if p == heads:
        return geometric(heads)
    return geometric(p) + geometric(2 * p)[0::2][: heads - p]


def torch_t5_buckets(seq_len, num_buckets, max_distance, bidirectional):
    """Raffel et al. 2020, sec. 2.1 (T5's relative position buckets), in T5's float32 order:
    relative = key - query; half the buckets per direction when bidirectional; below num/2 one
    bucket per distance, then logarithmic up to max_distance, then the last bucket."""
    q = torch.arange(seq_len)[:, None]
    kpos = torch.arange(seq_len)[None, :]
    rel = kpos - q
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = torch.clamp(-rel, min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(dist.float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return out + torch.where(dist < exact, dist, large)


# ---------------------------------------------------------------------------------------------
# Sinusoidal.


@pytest.mark.parametrize("dim", [1, 3, 8, 33, 64])
@pytest.mark.parametrize("base", [100.0, 10000.0])
def test_sinusoidal_table(tmp_path, dim, base):
    seq_len = 1031
    got = table(tmp_path, "--kind", "sinusoidal", "--seq-len", seq_len, "--dim", dim, "--base",
                base)
    assert got.dtype == np.float32 and got.shape == (seq_len, dim)
    ref, _ = torch_sinusoidal(seq_len, dim, base)
    # Rounded once to float32 from a double angle: half an ulp, plus the two double angles
    # (ropekit's and torch's, each within an ulp) differing by up to |angle| * 2^-51.
    tol = F32_HALF_ULP_1 + (seq_len - 1) * 2.0**-51
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=tol)
    if dim % 2:
        assert np.all(got[:, -1] == 0)


def test_sinusoidal_seed_example(tmp_path):
    got = table(tmp_path, "--kind", "sinusoidal", "--seq-len", 3, "--dim", 3, "--base", 100)
    expected = [[0, 1, 0], [0.84147098, 0.54030231, 0], [0.90929743, -0.41614684, 0]]
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-9 + F32_HALF_ULP_1)


def test_sinusoidal_json_matches_npy(tmp_path):
    got = table(tmp_path, "--kind", "sinusoidal", "--seq-len", 5, "--dim", 6)
    info = json.loads(run("--kind", "sinusoidal", "--seq-len", 5, "--dim", 6, "--json").stdout)
    assert info["kind"] == "sinusoidal" and info["acts_on"] == ["embeddings"]
    assert info["shape"] == [5, 6]
    np.testing.assert_array_equal(np.array(info["table"], dtype=np.float32), got)


# ---------------------------------------------------------------------------------------------
# ALiBi.


@pytest.mark.parametrize("heads", list(range(1, 17)) + [24, 48, 100])
def test_alibi_slopes(tmp_path, heads):
    got = table(tmp_path, "--kind", "alibi", "--heads", heads)
    assert got.dtype == np.float64 and got.shape == (heads,)
    np.testing.assert_allclose(got, alibi_slopes(heads), rtol=4e-16 * (heads + 3), atol=0)


def test_alibi_published_slopes(tmp_path):
    published = {
        4: [0.25, 0.0625, 0.015625, 0.00390625],
        6: [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125],
        12: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625, 0.707107,
             0.353553, 0.176777, 0.0883883],
    }
    for heads, values in published.items():
        np.testing.assert_allclose(table(tmp_path, "--kind", "alibi", "--heads", heads), values,
                                   rtol=5e-6)


@pytest.mark.parametrize("heads", [3, 8, 12])
def test_alibi_bias_matches_torch(tmp_path, heads):
    seq_len = 97
    got = table(tmp_path, "--kind", "alibi", "--heads", heads, "--seq-len", seq_len)
    assert got.dtype == np.float32 and got.shape == (heads, seq_len, seq_len)
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64)
    i = torch.arange(seq_len, dtype=torch.float64)[:, None]
    j = torch.arange(seq_len, dtype=torch.float64)[None, :]
    ref = (-slopes[:, None, None] * (i - j)).to(torch.float32)  # rounded once, like ropekit
    np.testing.assert_array_equal(got, ref.numpy())
    # Only i - j matters: every diagonal is constant.
    for offset in (-5, 0, 7):
        diag = np.diagonal(got, offset=offset, axis1=1, axis2=2)
        assert np.all(diag == diag[:, :1])


def test_alibi_softmax_matches_official_form(tmp_path):
    """The reference code adds m * j (a per-row constant away from -m (i - j)); the softmax over
    the causally visible keys is the same."""
    heads, seq_len = 4, 33
    bias = torch.from_numpy(table(tmp_path, "--kind", "alibi", "--heads", heads, "--seq-len",
                                  seq_len)).double()
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64)
    official = slopes[:, None, None] * torch.arange(seq_len, dtype=torch.float64)[None, None, :]
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    logits = torch.randn(heads, seq_len, seq_len, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    a = torch.softmax((logits + bias).masked_fill(mask, -math.inf), dim=-1)
    b = torch.softmax((logits + official).masked_fill(mask, -math.inf), dim=-1)
    # bias is float32: |bias - exact| <= 2^-24 |bias| <= 2^-24 * 32 / 2; softmax is 1-Lipschitz in
    # the max norm of its input up to a factor 2.
    torch.testing.assert_close(a, b, rtol=0, atol=2 * 2.0**-24 * 16)


# ---------------------------------------------------------------------------------------------
# T5.


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 128), (32, 256), (8, 20),
                                                      (64, 1000), (10, 100)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_buckets_match_torch(tmp_path, num_buckets, max_distance, bidirectional):
    seq_len = 1100
    args = ["--kind", "t5", "--seq-len", seq_len, "--num-buckets", num_buckets,
            "--max-distance", max_distance]
    if bidirectional:
        args.append("--bidirectional")
    got = table(tmp_path, *args)
    assert got.dtype == np.int64 and got.shape == (seq_len, seq_len)
    ref = torch_t5_buckets(seq_len, num_buckets, max_distance, bidirectional)
    np.testing.assert_array_equal(got, ref.numpy())


def test_t5_published_buckets(tmp_path):
    got = table(tmp_path, "--kind", "t5", "--seq-len", 1001)
    n = [0, 1, 7, 15, 16, 17, 20, 24, 32, 48, 64, 90, 100, 116, 117, 127, 128, 200, 1000]
    expected = [0, 1, 7, 15, 16, 16, 17, 19, 21, 24, 26, 29, 30, 31, 31, 31, 31, 31, 31]
    # Query 1000, key 1000 - n.
    assert [int(got[1000, 1000 - d]) for d in n] == expected


def test_t5_bias_gradient_is_a_bucket_sum(tmp_path):
    """What AddLogitBiasBackward computes, stated with autograd on an independent T5 bias module:
    d loss / d table[b, h] is the sum of d loss / d logit over the (i, j) in bucket b."""
    seq_len, heads, buckets = 40, 3, 16
    bucket = torch.from_numpy(table(tmp_path, "--kind", "t5", "--seq-len", seq_len,
                                    "--num-buckets", buckets, "--max-distance", 32))
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(buckets, heads, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(heads, seq_len, seq_len, dtype=torch.float64, generator=gen)
    bias = torch.nn.functional.embedding(bucket, weight).permute(2, 0, 1)  # [H, T, T]
    (bias * upstream).sum().backward()
    expected = torch.zeros(buckets, heads, dtype=torch.float64)
    for b in range(buckets):
        expected[b] = upstream[:, bucket == b].sum(dim=1)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Learned absolute.

MASK64 = (1 << 64) - 1


def splitmix_normal(seed, count, std):
    """The documented init: splitmix64 draws, Box-Muller pairs in double, u1 in (0, 1]."""
    state = seed
    out = []

    def draw():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    while len(out) < count:
        u1 = ((draw() >> 11) + 1) * 2.0**-53
        u2 = (draw() >> 11) * 2.0**-53
        r = math.sqrt(-2.0 * math.log(u1))
        out += [std * r * math.cos(2 * math.pi * u2), std * r * math.sin(2 * math.pi * u2)]
    return np.array(out[:count], dtype=np.float64)


def test_learned_init(tmp_path):
    got = table(tmp_path, "--kind", "learned", "--seq-len", 33, "--dim", 7, "--seed", 12345)
    assert got.dtype == np.float32 and got.shape == (33, 7)
    ref = splitmix_normal(12345, 33 * 7, 0.02).reshape(33, 7)
    # cos/sin/log/sqrt of libm vs Python's (both double, within a few ulp) then float32 rounding.
    np.testing.assert_allclose(got, ref, rtol=2.0**-24, atol=1e-15)
    again = table(tmp_path, "--kind", "learned", "--seq-len", 33, "--dim", 7, "--seed", 12345)
    np.testing.assert_array_equal(got, again)
    other = table(tmp_path, "--kind", "learned", "--seq-len", 33, "--dim", 7, "--seed", 12346)
    assert not np.array_equal(got, other)
    big = table(tmp_path, "--kind", "learned", "--seq-len", 1024, "--dim", 128, "--init-std", 0.5)
    n = big.size
    assert abs(big.mean()) < 5 * 0.5 / math.sqrt(n)
    assert abs(big.std() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)


# ---------------------------------------------------------------------------------------------
# RoPE table.


@pytest.mark.parametrize("dim,base", [(32, 10000.0), (128, 500000.0), (6, 100.0)])
def test_rope_table_matches_torch(tmp_path, dim, base):
    seq_len = 4097
    got = table(tmp_path, "--kind", "rope", "--seq-len", seq_len, "--dim", dim, "--base", base)
    assert got.dtype == np.float32 and got.shape == (seq_len, dim)
    inv_freq = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float64),
                               torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    ref = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    tol = F32_HALF_ULP_1 + angle.max().item() * 2.0**-51
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=tol)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}])
def test_rope_table_from_config(tmp_path, scaling):
    """A config with partial rotary (R = D / 2), base 5e5 and optionally linear scaling (position
    interpolation, Chen et al. 2023: angle = (p / s) * w)."""
    config = {"model_type": "gpt_neox", "hidden_size": 512, "num_attention_heads": 4,
              "rotary_pct": 0.5, "rotary_emb_base": 500000.0, "max_position_embeddings": 2048}
    if scaling:
        config["rope_scaling"] = scaling
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    seq_len = 3001
    got = table(tmp_path, "--kind", "rope", "--seq-len", seq_len, "--config", path)
    rotary = 64  # head_dim 128 * rotary_pct 0.5
    assert got.shape == (seq_len, rotary)
    inv_freq = 1.0 / torch.pow(torch.tensor(500000.0, dtype=torch.float64),
                               torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
    if scaling:
        inv_freq = inv_freq / scaling["factor"]
    angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    ref = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    tol = F32_HALF_ULP_1 + angle.max().item() * 2.0**-51
    np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# Command line behaviour.


def test_none_kind():
    proc = run("--kind", "nope")
    assert "no position information" in proc.stdout
    info = json.loads(run("--kind", "none", "--json").stdout)
    assert info == {"kind": "none", "acts_on": []}


@pytest.mark.parametrize("args,option", [
    (["--kind", "sinusiodal"], "--kind"),
    (["--kind", "t5"], "--seq-len"),
    (["--kind", "t5", "--seq-len", "12x"], "--seq-len"),
    (["--kind", "t5", "--seq-len", "4", "--num-buckets", "1"], "--num-buckets"),
    (["--kind", "t5", "--seq-len", "4", "--max-distance", "8", "--num-buckets", "32"],
     "--max-distance"),
    (["--kind", "alibi", "--heads", "0"], "--heads"),
    (["--kind", "alibi", "--heads", "4", "--dim", "8"], "--dim"),
    (["--kind", "alibi", "--heads", "2", "--seq-len", "20000"], "--seq-len"),
    (["--kind", "sinusoidal", "--seq-len", "4", "--dim", "4", "--base", "nan"], "--base"),
    (["--kind", "learned", "--seq-len", "4", "--dim", "4", "--init-std", "-1"], "--init-std"),
    (["--kind", "rope", "--seq-len", "4", "--dim", "5"], "--dim"),
    (["--kind", "rope", "--seq-len", "4", "--config", "missing.json"], "missing.json"),
    (["--kind", "none", "--output", "x.npy"], "--output"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, option):
    proc = subprocess.run([CLI, "pe", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], proc.stderr
    assert not (tmp_path / "x.npy").exists()


# The table limit is 2^28 bytes in the output dtype (256 MiB); the command builds the table in
# its output bytes and writes it without another copy, so its peak memory is the table plus the
# process baseline, and at most twice the table for sinusoidal/learned (one float32 copy while
# converting). The slack covers the baseline (the binary, its libraries, the heap's bookkeeping).
TABLE_LIMIT = 1 << 28
BASELINE_SLACK = 64 << 20


# A child's ru_maxrss includes the memory of the process it was forked from before its exec, so
# the command runs as the grandchild of a small Python process, which reports the command's peak.
RSS_PROBE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("probe", os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_bytes(args, cwd):
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, CLI, "pe", *args], cwd=cwd,
                          capture_output=True, text=True)
    _, code, kilobytes = proc.stdout.strip().splitlines()[-1].split()
    assert code == "0", proc.stderr
    return int(kilobytes) * 1024  # Linux reports kilobytes


@pytest.mark.parametrize("kind,copies", [("rope", 1), ("sinusoidal", 2)])
def test_table_at_the_limit_stays_within_its_stated_memory(tmp_path, kind, copies):
    # 131072 positions x 512 float32 values = exactly 2^28 bytes.
    args = ["--kind", kind, "--seq-len", "131072", "--dim", "512", "--output", "t.npy"]
    peak = peak_rss_bytes(args, tmp_path)
    assert peak <= copies * TABLE_LIMIT + BASELINE_SLACK, peak
    table = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert table.shape == (131072, 512) and table.nbytes == TABLE_LIMIT


def test_table_over_the_limit_and_json_over_its_limit_are_refused(tmp_path):
    over = subprocess.run([CLI, "pe", "--kind", "rope", "--seq-len", "131073", "--dim", "512"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert over.returncode == 1 and "--seq-len" in over.stderr and "268435456" in over.stderr
    json_big = subprocess.run([CLI, "pe", "--kind", "t5", "--seq-len", "2049", "--json"],
                              capture_output=True, text=True, cwd=tmp_path)
    assert json_big.returncode == 1 and "--json" in json_big.stderr, json_big.stderr
