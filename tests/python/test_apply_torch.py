"""Parity of `ropekit apply` with independent oracles written here from the published formulas.

Two oracles, both implemented in this file (nothing is taken from ropekit):

* `hf_*`: a PyTorch float32 re-statement of Hugging Face transformers' rotary embedding (inverse
  frequencies per rope type in transformers' float32 order of operations, theta = fl32(p) * w,
  cos/sin times A rounded to the activation dtype, then x*cos + rotate_half(x)*sin with each op
  rounded in the activation dtype). Compared with `--numerics hf`.
* `exact_*`: the same mathematics in float64 with exact angles p * w. Compared with
  `--numerics exact`.

Every tolerance below is derived in the comment next to it; none was tuned to make a run pass.
Notation: for a rotated pair (a, b) of the input, r = |x_a| + |x_b|; A is the attention factor;
u32 = 2^-24 (float32 unit roundoff), u16 = 2^-11 (float16 unit roundoff).
"""

import math
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError(
        "ROPEKIT_CLI is not set: point it at the built `ropekit` binary "
        "(ctest sets it; by hand: ROPEKIT_CLI=build/release/tools/ropekit pytest tests/python)")
if not os.access(CLI, os.X_OK):
    raise RuntimeError(f"ROPEKIT_CLI={CLI!r} is not an executable file")

U32 = 2.0**-24
U16 = 2.0**-11
FP16_SUBNORMAL_HALF_ULP = 2.0**-25

# Positions from the brief of the test plan: small, just past powers of two, and large primes
# (non-power-of-two so float32 products round), shuffled below.
SPECIAL_POSITIONS = [0, 1, 7, 4097, 32771, 131101, 1048573]
NUM_HEADS = 2

# ---------------------------------------------------------------------------------------------
# Configurations: one per rope type (two for yarn, two for longrope). `make(head_dim, partial)`
# returns the config dict; MPE = max_position_embeddings, OMP = original_max_position_embeddings.
# ---------------------------------------------------------------------------------------------


def _base_config(head_dim, partial, theta, mpe, scaling=None, **extra):
    cfg = {
        "model_type": "llama",
        "hidden_size": head_dim * 4,
        "num_attention_heads": 4,
        "head_dim": head_dim,
        "rope_theta": theta,
        "partial_rotary_factor": partial,
        "max_position_embeddings": mpe,
    }
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    cfg.update(extra)
    return cfg


def _longrope_factors(n, seed):
    rng = np.random.default_rng(seed)
    # Phi-3-like magnitudes: short factors near 1, long factors growing to tens.
    short = [float(round(v, 6)) for v in 1.0 + 0.1 * rng.random(n)]
    long = [float(round(v, 4)) for v in np.linspace(1.0, 40.0, n) * (1 + 0.05 * rng.random(n))]
    return short, long


CASES = {
    "default": dict(make=lambda hd, pf: _base_config(hd, pf, 10000.0, 4096)),
    "linear": dict(make=lambda hd, pf: _base_config(
        hd, pf, 500000.0, 8192, {"rope_type": "linear", "factor": 4.0})),
    # max(P)+1 = 1048574 > MPE: the base grows (transformers' runtime float32 chain).
    "dynamic": dict(make=lambda hd, pf: _base_config(
        hd, pf, 10000.0, 4096, {"rope_type": "dynamic", "factor": 2.0})),
    # --seq-len at or below MPE: the construction-time (default) frequencies.
    "dynamic_short": dict(make=lambda hd, pf: _base_config(
        hd, pf, 10000.0, 4096, {"rope_type": "dynamic", "factor": 2.0}), seq_len=4096),
    "yarn_mscale": dict(make=lambda hd, pf: _base_config(
        hd, pf, 10000.0, 163840,
        {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0})),
    "yarn_no_truncate": dict(make=lambda hd, pf: _base_config(
        hd, pf, 150000.0, 131072,
        {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})),
    # OMP at the top level (Phi-3 style); s = MPE / OMP = 32.
    "longrope_short": dict(make=lambda hd, pf: _base_config(
        hd, pf, 10000.0, 131072,
        dict(zip(("short_factor", "long_factor"),
                 _longrope_factors(int(hd * pf) // 2, hd)), rope_type="longrope"),
        original_max_position_embeddings=4096), seq_len=4096),
    "longrope_long": dict(make=lambda hd, pf: _base_config(
        hd, pf, 10000.0, 131072,
        dict(zip(("short_factor", "long_factor"),
                 _longrope_factors(int(hd * pf) // 2, hd)), rope_type="longrope"),
        original_max_position_embeddings=4096)),
    "llama3": dict(make=lambda hd, pf: _base_config(
        hd, pf, 500000.0, 131072,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192})),
}

HEAD_DIMS = [64, 80, 96, 128]
PARTIALS = [0.25, 0.5, 1.0]


def head_dim_of(cfg):
    """head_dim, else hidden_size // num_attention_heads (GPT-J: n_embd // n_head)."""
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if "hidden_size" in cfg:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["n_embd"] // cfg["n_head"]


def rope_fields(cfg, layer_type=None):
    """(rotary dim d, theta, MPE, scaling dict with rope_type) as transformers reads them
    (transformers' `rope_config_validation` and `standardize_rope_params`): rope_scaling or v5 rope_parameters, `type` alias, Phi-3 su/yarn ->
    longrope, mrope -> default, GPT-NeoX rotary_pct / rotary_emb_base, GPT-J rotary_dim."""
    params = cfg.get("rope_parameters") or {}
    if layer_type is not None:  # per-layer-type dict (Gemma-3 style)
        params = params[layer_type]
    elif "full_attention" in params:  # default: the full-attention entry
        params = params["full_attention"]
    scaling = dict(cfg.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("su", "yarn") and cfg.get("model_type") in ("phi3", "phimoe"):
        kind = "longrope"
    if kind == "mrope":
        kind = "default"
    scaling["rope_type"] = kind
    head_dim = head_dim_of(cfg)
    if cfg.get("model_type") == "gptj":
        d, base = int(cfg.get("rotary_dim") or head_dim), 10000.0
    else:
        partial = params.get("partial_rotary_factor",
                             cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
        d = int(head_dim * partial)  # Python double product, then truncation
        base = float(params.get("rope_theta",
                                cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))))
    mpe = int(cfg.get("max_position_embeddings", cfg.get("n_positions", 2048)))
    if cfg.get("original_max_position_embeddings"):  # top-level OMP has priority (v5)
        scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    if kind in ("yarn", "longrope", "llama3"):
        scaling.setdefault("original_max_position_embeddings", mpe)
    if kind == "yarn" and not scaling.get("factor"):
        scaling["factor"] = mpe / scaling["original_max_position_embeddings"]
    return d, base, mpe, scaling


def yarn_attention_factor(s, sc):
    def g(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    if sc.get("mscale") and sc.get("mscale_all_dim"):
        return g(s, sc["mscale"]) / g(s, sc["mscale_all_dim"])
    return g(s, 1.0)


def yarn_range(d, base, sc):
    """Correction range (low, high) in Python doubles (transformers' find_correction_range)."""
    omp = sc["original_max_position_embeddings"]

    def dim_for(rotations):
        return d * math.log(omp / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(sc.get("beta_fast") or 32), dim_for(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    return low, high


def longrope_scale(mpe, sc):
    omp = sc["original_max_position_embeddings"]
    s = sc.get("factor") or mpe / omp
    if sc.get("attention_factor") is not None:
        return s, float(sc["attention_factor"])
    return s, (1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(omp)))


# ---------------------------------------------------------------------------------------------
# Oracle 1: transformers' float32 computation, re-stated in PyTorch (modeling_rope_utils.py's _compute_*_parameters).
# ---------------------------------------------------------------------------------------------


def nudge(t, ulps):
    """Moves every float32 entry of t by `ulps` units in the last place."""
    for _ in range(abs(ulps)):
        t = torch.nextafter(t, torch.full_like(t, math.copysign(math.inf, ulps)))
    return t


def hf_inv_freq(cfg, seq_len, pow_ulps=0):
    """(w [N] float32, A). pow_ulps moves every float32 pow result by that many ulps: the
    freedom a float32 pow has between implementations (glibc powf vs torch CPU's vectorised pow), used for tolerances."""
    d, base, mpe, sc = rope_fields(cfg)
    kind = sc["rope_type"]
    e = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # fl32(2i) / fl32(d), one rounding

    def pow32(b):
        return nudge(b ** e, pow_ulps)  # python float ** tensor: float32 pow with fl32(b)

    def default_w(b):
        return 1.0 / pow32(b)  # a correctly rounded reciprocal of the pow

    if kind == "default":
        return default_w(base), 1.0
    if kind == "linear":
        return default_w(base) / sc["factor"], 1.0
    if kind == "dynamic":
        if seq_len <= mpe:  # construction-time frequencies are kept
            return default_w(base), 1.0
        # Runtime: seq_len is a 0-d int64 tensor, so the base is a float32 tensor chain; the
        # 0-d pow with a python exponent runs in double and rounds (torch CPU scalar path).
        s = torch.tensor(seq_len, dtype=torch.int64)
        factor = sc["factor"]
        new_base = base * ((factor * s / mpe) - (factor - 1)) ** (d / (d - 2))
        return 1.0 / pow32(new_base), 1.0
    if kind == "yarn":
        s = sc["factor"]
        low, high = yarn_range(d, base, sc)
        pos_freqs = pow32(base)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (s * pos_freqs)
        ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        w = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
        return w, yarn_attention_factor(s, sc)
    if kind == "longrope":
        omp = sc["original_max_position_embeddings"]
        _, a = longrope_scale(mpe, sc)
        ext = sc["long_factor"] if seq_len > omp else sc["short_factor"]
        ext = torch.tensor(ext, dtype=torch.float32)
        return 1.0 / (ext * pow32(base)), a
    if kind == "llama3":
        w = default_w(base)
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        omp = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = omp / lo, omp / hi
        wavelen = 2 * math.pi / w  # python scalar / tensor: reciprocal, then multiply
        w_scaled = torch.where(wavelen > low_wavelen, w / factor, w)
        smooth = (omp / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * w_scaled / factor + smooth * w_scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, w_scaled), 1.0
    raise AssertionError(kind)


def rotate_half(x):
    n = x.shape[-1] // 2
    return torch.cat((-x[..., n:], x[..., :n]), dim=-1)


def rotate_every_two(x):
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack((-b, a), dim=-1).flatten(-2)


def hf_apply(cfg, x_np, positions, seq_len, layout, backward=False):
    """transformers' forward: tables in float32, rounded to x's dtype, three rounded ops."""
    d = rope_fields(cfg)[0]
    w, a = hf_inv_freq(cfg, seq_len)
    theta = torch.from_numpy(positions).float()[:, None] * w[None, :]  # [T, N], fl32(p) * w
    if backward:
        theta = -theta
    if layout == "neox":
        emb, rot = torch.cat((theta, theta), dim=-1), rotate_half
    else:
        emb, rot = torch.repeat_interleave(theta, 2, dim=-1), rotate_every_two
    x = torch.from_numpy(x_np)
    cos = (emb.cos() * a).to(x.dtype)[:, None, :]  # [T, 1, R]
    sin = (emb.sin() * a).to(x.dtype)[:, None, :]
    x_rot = x[..., :d]
    y = torch.cat(((x_rot * cos) + (rot(x_rot) * sin), x[..., d:]), dim=-1)
    return y.numpy()


# ---------------------------------------------------------------------------------------------
# Oracle 2: exact mathematics in float64.
# ---------------------------------------------------------------------------------------------


def exact_inv_freq(cfg, seq_len):
    d, base, mpe, sc = rope_fields(cfg)
    kind = sc["rope_type"]
    i = np.arange(d // 2, dtype=np.float64)
    e = 2 * i / d

    if kind == "default":
        return base ** -e, 1.0
    if kind == "linear":
        return base ** -e / sc["factor"], 1.0
    if kind == "dynamic":
        if seq_len <= mpe:
            return base ** -e, 1.0
        f = sc["factor"]
        new_base = base * (f * seq_len / mpe - (f - 1)) ** (d / (d - 2))
        return new_base ** -e, 1.0
    if kind == "yarn":
        s = sc["factor"]
        low, high = yarn_range(d, base, sc)
        keep = 1 - np.clip((i - low) / (high - low), 0, 1)  # weight of the unscaled frequency
        w0 = base ** -e
        return w0 / s * (1 - keep) + w0 * keep, yarn_attention_factor(s, sc)
    if kind == "longrope":
        omp = sc["original_max_position_embeddings"]
        _, a = longrope_scale(mpe, sc)
        ext = np.array(sc["long_factor"] if seq_len > omp else sc["short_factor"], np.float64)
        return base ** -e / ext, a
    if kind == "llama3":
        w = base ** -e
        f, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        omp = sc["original_max_position_embeddings"]
        wavelen = 2 * np.pi / w
        sigma = (omp / wavelen - lo) / (hi - lo)
        out = np.where(wavelen < omp / hi, w, np.where(wavelen > omp / lo, w / f,
                                                       (1 - sigma) * w / f + sigma * w))
        return out, 1.0
    raise AssertionError(kind)


def exact_apply(cfg, x_np, positions, seq_len, layout, backward=False):
    """float64 y and the per-element pair magnitude r (0 for pass-through channels), and A."""
    d = rope_fields(cfg)[0]
    n = d // 2
    w, a = exact_inv_freq(cfg, seq_len)
    theta = positions.astype(np.float64)[:, None] * w[None, :]
    if backward:
        theta = -theta
    c, s = (a * np.cos(theta))[:, None, :], (a * np.sin(theta))[:, None, :]  # [T, 1, N]
    x = x_np.astype(np.float64)
    y = x.copy()
    r = np.zeros_like(x)
    if layout == "neox":
        ia, ib = np.arange(n), np.arange(n) + n
    else:
        ia, ib = 2 * np.arange(n), 2 * np.arange(n) + 1
    xa, xb = x[..., ia], x[..., ib]
    y[..., ia] = xa * c - xb * s
    y[..., ib] = xb * c + xa * s
    r[..., ia] = r[..., ib] = np.abs(xa) + np.abs(xb)
    return y, r, a


# ---------------------------------------------------------------------------------------------
# Running the command line.
# ---------------------------------------------------------------------------------------------


def run_apply(tmp, cfg, x, positions, *extra):
    import json
    cfg_path, x_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "x.npy")
    p_path, y_path = os.path.join(tmp, "p.npy"), os.path.join(tmp, "y.npy")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    np.save(x_path, x)
    np.save(p_path, positions)
    if os.path.exists(y_path):
        os.remove(y_path)
    args = [CLI, "apply", "--config", cfg_path, "--input", x_path, "--positions", p_path,
            "--output", y_path, *[str(e) for e in extra]]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)} failed: {proc.stderr}"
    assert proc.stderr == "", proc.stderr
    y = np.load(y_path)
    assert y.dtype == x.dtype and y.shape == x.shape
    return y


def make_inputs(head_dim, dtype, seed):
    rng = np.random.default_rng(seed)
    extra = rng.integers(0, 2**20, size=5).tolist() + [2**24 - 1, 4095]
    positions = np.array(SPECIAL_POSITIONS + extra, dtype=np.int64)
    rng.shuffle(positions)
    x = rng.standard_normal((len(positions), NUM_HEADS, head_dim)).astype(dtype)
    return x, positions


def hf_frequency_freedom(cfg, seq_len):
    """Per pair: how far w may lie from transformers' when the float32 pow differs by 1 ulp.

    ropekit forms w in transformers' float32 order except for the pow, which may differ by 1 ulp
    from torch CPU's vectorised float32 pow. The oracle is re-run with every pow result moved
    by -1 and +1 ulp; the type's later float32 steps (reciprocal, YaRN blend, llama3 smoothing,
    whose cancellation amplifies the change several-fold) propagate it exactly as they would in
    ropekit. One more ulp of w covers the final rounding landing on the other side.
    """
    w0 = hf_inv_freq(cfg, seq_len)[0].double().numpy()
    dw = np.zeros_like(w0)
    for ulps in (-1, 1):
        dw = np.maximum(dw, np.abs(hf_inv_freq(cfg, seq_len, ulps)[0].double().numpy() - w0))
    return dw + w0 * 2.0**-23


def hf_tolerance(r, a, p, w_at, dw_at, dtype):
    """Bound on |ropekit --numerics hf - transformers| per element ([T, H, D] arrays).

    Angle: theta = fl32(p) * w differs by <= p * |dw| + ulp(theta) (two products rounded in the
    same binade; 0 when w is identical), ulp(theta) <= p * w * 2^-23; cos/sin times A then move
    by at most A * |dtheta|.
    Values: each side's float32 cos/sin is within 1 ulp (<= 2^-24 for |v| < 1, torch CPU ~1 ulp,
    ropekit 0.5 ulp) -> 1.5 u32; the two roundings of the multiply by A -> 2 u32; transformers
    rounds x*cos, rot*sin and the sum (3 u32), ropekit at most as often (3 u32). Each term is a
    relative error of a quantity bounded by r*A, so c = 1.5 + 2 + 3 + 3 = 9.5 -> 10 u32.
    float16 adds: transformers rounds cos and sin to fp16 (u16 each, relative to values <= A),
    its products and sum (3 u16), and ropekit's output rounding (u16): 6 u16, plus an absolute
    fp16 subnormal half-ulp per rounding (4 of them on the path of one element).
    """
    d_theta = p * (dw_at + (dw_at > 0) * w_at * 2.0**-23)
    tol = r * a * (d_theta + 10 * U32)
    if dtype == np.float16:
        tol = tol + r * a * 6 * U16 + 4 * FP16_SUBNORMAL_HALF_ULP
    return tol


def exact_tolerance(r, a, y_exact, dtype):
    """Bound on |ropekit --numerics exact - float64 math| per element.

    rope.h promises cos/sin table entries within 1.2e-7 of A*cos(p*w) for A <= 2 and p < 2^24
    (double angles rounded once to float32). The float32 rotation a*c - b*s rounds the two
    products and the difference: <= 2 u32 * (|a c| + |b s|) + u32 * |y| <= 3 u32 * r * A
    (first order; FMA only removes roundings). The float64 oracle's own error is ~1e-16
    relative on angles <= 2^24 rad, i.e. < 1e-8 * 2^-24 of the bound; 1e-12 * r covers it.
    float16: the input is exact in float32; the float32 result y32 (within tol32 of y) is
    rounded once to fp16: <= u16 * |y32| <= u16 * (|y| + tol32) (relative half-ulp), or the
    subnormal half-ulp 2^-25.
    """
    tol = r * (1.2e-7 + 3 * U32 * a) + 1e-12 * r
    if dtype == np.float16:
        tol = tol * (1 + U16) + U16 * np.abs(y_exact) + FP16_SUBNORMAL_HALF_ULP
    return tol


def per_channel_w(w, d, head_dim, layout):
    """w of the pair each channel belongs to, [D] (0 for pass-through channels)."""
    n = d // 2
    out = np.zeros(head_dim)
    if layout == "neox":
        out[:n], out[n:d] = w, w
    else:
        out[0:d:2], out[1:d:2] = w, w
    return out


def check_pass_through(x, y, d):
    """Channels [R, D) must be bit-identical copies."""
    assert x[..., d:].tobytes() == y[..., d:].tobytes(), "pass-through channels changed"


# Every rope type meets every head_dim once; the partial factor rotates with the type index (a
# Latin-square design), so each (head_dim, partial factor) pair is covered by three rope types
# while the suite stays within its time budget (each command builds its full cos/sin table).
CASE_GRID = [(kind, hd, PARTIALS[(j + k) % len(PARTIALS)])
             for k, kind in enumerate(CASES) for j, hd in enumerate(HEAD_DIMS)]


@pytest.mark.parametrize("kind,head_dim,partial", CASE_GRID,
                         ids=[f"{k}-D{h}-f{p}" for k, h, p in CASE_GRID])
def test_parity(kind, head_dim, partial):
    case = CASES[kind]
    cfg = case["make"](head_dim, partial)
    d = rope_fields(cfg)[0]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (np.float32, np.float16):
            x, positions = make_inputs(head_dim, dtype, seed=head_dim * 10 + int(partial * 4))
            seq_len = case.get("seq_len", int(positions.max()) + 1)
            extra = ["--seq-len", seq_len] if "seq_len" in case else []
            r = None
            # Both layouts in float32; float16 (whose extra roundings do not depend on the
            # channel order) alternates the layout across cases to save commands.
            layouts = ("neox", "gptj") if dtype == np.float32 else (
                ("neox", "gptj")[(head_dim // 16 + len(kind)) % 2],)
            for layout in layouts:
                # --numerics exact against float64 mathematics.
                y = run_apply(tmp, cfg, x, positions, "--layout", layout, "--numerics", "exact",
                              *extra)
                check_pass_through(x, y, d)
                y64, r, a = exact_apply(cfg, x, positions, seq_len, layout)
                err = np.abs(y.astype(np.float64) - y64)
                tol = exact_tolerance(r, a, y64, dtype)
                worst = np.unravel_index(np.argmax(err - tol), err.shape)
                assert np.all(err <= tol), (
                    f"exact {layout} {np.dtype(dtype).name}: |err| {err[worst]:.3g} > "
                    f"{tol[worst]:.3g} at token {worst[0]} (p={positions[worst[0]]}) "
                    f"channel {worst[2]}")

                # --numerics hf against transformers' float32 pipeline.
                y = run_apply(tmp, cfg, x, positions, "--layout", layout, "--numerics", "hf",
                              *extra)
                check_pass_through(x, y, d)
                yh = hf_apply(cfg, x, positions, seq_len, layout).astype(np.float64)
                w_hf, a_hf = hf_inv_freq(cfg, seq_len)
                w_at = per_channel_w(w_hf.double().numpy(), d, head_dim, layout)
                dw_at = per_channel_w(hf_frequency_freedom(cfg, seq_len), d, head_dim, layout)
                p = positions.astype(np.float64)[:, None, None]
                err = np.abs(y.astype(np.float64) - yh)
                tol = hf_tolerance(r, a_hf, p, w_at, dw_at, dtype)
                worst = np.unravel_index(np.argmax(err - tol), err.shape)
                assert np.all(err <= tol), (
                    f"hf {layout} {np.dtype(dtype).name}: |err| {err[worst]:.3g} > "
                    f"{tol[worst]:.3g} at token {worst[0]} (p={positions[worst[0]]}) "
                    f"channel {worst[2]}")
                # Most inv_freq entries are bit-identical to transformers' (a pow differs by an
                # ulp in ~1-3% of entries), so most elements must also meet the
                # bound with no frequency difference at all.
                tight = hf_tolerance(r, a_hf, p, w_at, 0 * dw_at, dtype)
                rotated = r > 0
                frac = np.mean((err <= tight)[rotated])
                assert frac >= 0.9, f"hf {layout}: only {frac:.3f} of elements match tightly"


def test_backward_is_the_inverse_rotation():
    """--backward rotates by -theta (times A): checked against the float64 oracle, and
    backward(forward(x)) = A^2 x within the two passes' bounds (the forward output's pair
    magnitude is <= sqrt(2) * A * r, so the second pass's bound uses that r)."""
    for kind in ("default", "yarn_mscale", "llama3"):
        cfg = CASES[kind]["make"](96, 1.0)
        x, positions = make_inputs(96, np.float32, seed=5)
        seq_len = int(positions.max()) + 1
        with tempfile.TemporaryDirectory() as tmp:
            yb = run_apply(tmp, cfg, x, positions, "--backward")
            yb64, r, a = exact_apply(cfg, x, positions, seq_len, "neox", backward=True)
            assert np.all(np.abs(yb - yb64) <= exact_tolerance(r, a, yb64, np.float32))
            y = run_apply(tmp, cfg, x, positions)
            z = run_apply(tmp, cfg, y, positions, "--backward")
            # z = A R^T (A R x + e1) + e2: R^T mixes the two errors of a pair, so the first
            # pass contributes A * (|e1_a| + |e1_b|) <= 2 A * one_pass.
            one_pass = exact_tolerance(r, a, yb64, np.float32)
            bound = 2 * a * one_pass + exact_tolerance(math.sqrt(2) * a * r, a, yb64, np.float32)
            err = np.abs(z.astype(np.float64) - a * a * x.astype(np.float64))
            assert np.all(err <= bound), f"{kind}: round trip error {err.max():.3g}"


def test_layout_defaults_to_the_config_and_threads_do_not_change_bits():
    cfg = CASES["llama3"]["make"](128, 0.5)
    x, positions = make_inputs(128, np.float32, seed=9)
    with tempfile.TemporaryDirectory() as tmp:
        y_default = run_apply(tmp, cfg, x, positions)
        y_neox = run_apply(tmp, cfg, x, positions, "--layout", "neox", "--numerics", "exact")
        y_gptj = run_apply(tmp, cfg, x, positions, "--layout", "gptj")
        assert y_default.tobytes() == y_neox.tobytes()  # llama is a NeoX-layout model type
        assert y_default.tobytes() != y_gptj.tobytes()
        for threads in ("0", "3"):
            y = run_apply(tmp, cfg, x, positions, "--threads", threads)
            assert y.tobytes() == y_default.tobytes()


def test_positions_int32_and_repeated_positions():
    """int32 positions give the same bytes as int64, and each token's result does not depend on
    the other tokens of the call (repeated positions, table grown by other positions)."""
    cfg = CASES["default"]["make"](64, 1.0)
    rng = np.random.default_rng(3)
    positions = np.array([5, 3, 5, 0, 1, 2, 3, 4, 5, 5], dtype=np.int64)
    x = rng.standard_normal((len(positions), NUM_HEADS, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        y64 = run_apply(tmp, cfg, x, positions)
        y32 = run_apply(tmp, cfg, x, positions.astype(np.int32))
        assert y64.tobytes() == y32.tobytes()
        for t in range(len(positions)):
            single = run_apply(tmp, cfg, x[t:t + 1], positions[t:t + 1])
            assert single.tobytes() == y64[t:t + 1].tobytes()


def test_empty_input():
    cfg = CASES["default"]["make"](64, 0.5)
    x = np.zeros((0, 3, 64), np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        y = run_apply(tmp, cfg, x, np.zeros((0,), np.int64))
        assert y.shape == (0, 3, 64) and y.dtype == np.float16


def test_gptj_config_uses_the_interleaved_layout_and_rotary_dim():
    """A GPT-J config (n_embd/n_head, rotary_dim 64 of head_dim 128, base 10000) rotates
    adjacent pairs of the first 64 channels by default; checked against the float64 oracle."""
    cfg = {"model_type": "gptj", "n_embd": 512, "n_head": 4, "rotary_dim": 64,
           "n_positions": 2048}
    oracle_cfg = _base_config(128, 0.5, 10000.0, 2048)  # the same geometry in LLaMA terms
    x, positions = make_inputs(128, np.float32, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        y = run_apply(tmp, cfg, x, positions)
    check_pass_through(x, y, 64)
    y64, r, a = exact_apply(oracle_cfg, x, positions, int(positions.max()) + 1, "gptj")
    assert np.all(np.abs(y - y64) <= exact_tolerance(r, a, y64, np.float32))


INTERLEAVED_MODEL_TYPES = {"gptj", "codegen"}


def bundled_examples():
    source_dir = os.environ.get("ROPEKIT_SOURCE_DIR")
    if not source_dir:
        raise RuntimeError("ROPEKIT_SOURCE_DIR is not set: point it at the source tree "
                           "(ctest sets it) so that the bundled examples/ configs are tested")
    examples = os.path.join(source_dir, "examples")
    return sorted(os.path.join(examples, f) for f in os.listdir(examples) if f.endswith(".json"))


def test_bundled_examples():
    """Every bundled example config, with its default layout: exact against float64 (float32
    and float16) and hf against the transformers re-statement (float32), at the shuffled
    special positions."""
    import json
    paths = bundled_examples()
    assert paths, "no example configs found"
    runs = []
    for path in paths:
        with open(path) as f:
            cfg = json.load(f)
        if "text_config" in cfg or "mrope_section" in (cfg.get("rope_scaling") or {}):
            continue  # multimodal (M-RoPE) examples take [3, T] positions: test_mrope_cli.py
        params = cfg.get("rope_parameters") or {}
        if params and all(isinstance(v, dict) for v in params.values()):
            # One run per layer type: the oracle sees that entry as the config's rope_parameters.
            for layer_type, entry in params.items():
                runs.append((path, cfg, dict(cfg, rope_parameters=entry),
                             ["--layer-type", layer_type]))
        else:
            runs.append((path, cfg, cfg, []))
    for path, original, cfg, select in runs:
        d, _, _, _ = rope_fields(cfg)
        head_dim = head_dim_of(cfg)
        layout = "gptj" if cfg.get("model_type") in INTERLEAVED_MODEL_TYPES else "neox"
        name = " ".join([os.path.basename(path)] + select)
        print(f"example {name}: rotary dim {d} of {head_dim}, {layout}")
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in (np.float32, np.float16):
                x, positions = make_inputs(head_dim, dtype, seed=len(name))
                seq_len = int(positions.max()) + 1
                y = run_apply(tmp, original, x, positions, *select)
                check_pass_through(x, y, d)
                y64, r, a = exact_apply(cfg, x, positions, seq_len, layout)
                err = np.abs(y.astype(np.float64) - y64)
                assert np.all(err <= exact_tolerance(r, a, y64, dtype)), (
                    f"{name} exact {np.dtype(dtype).name}: max err {err.max():.3g}")
                if dtype != np.float32 or layout != "neox":
                    continue  # GPT-J's transformers pipeline differs (float32 tables)
                y = run_apply(tmp, original, x, positions, "--numerics", "hf", *select)
                yh = hf_apply(cfg, x, positions, seq_len, layout).astype(np.float64)
                w_hf, a_hf = hf_inv_freq(cfg, seq_len)
                w_at = per_channel_w(w_hf.double().numpy(), d, head_dim, layout)
                dw_at = per_channel_w(hf_frequency_freedom(cfg, seq_len), d, head_dim, layout)
                p = positions.astype(np.float64)[:, None, None]
                err = np.abs(y.astype(np.float64) - yh)
                tol = hf_tolerance(r, a_hf, p, w_at, dw_at, dtype)
                assert np.all(err <= tol), f"{name} hf: max excess {(err - tol).max():.3g}"
