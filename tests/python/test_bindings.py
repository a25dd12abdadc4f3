"""Python bindings: parity of ropekit.apply_rope with an independent PyTorch implementation of
the Hugging Face formulas, for every rope type, both layouts, partial rotary, fp32/bf16/fp16, at
large non-power-of-two positions; plus config handling.

The oracle below is written from the published formulas (transformers' modeling_rope_utils /
rotate_half / rotate_every_two, restated in the project's RoPE spec), not from ropekit's code:
  * numerics="hf": inverse frequencies in transformers' float32 order of operations (torch
    float32 ops, exactly as the Python code does them), angle fl32(p) * w in float32, torch
    float32 cos/sin, times fl32(A).
  * numerics="exact": the same formulas in float64 (NumPy), angle p * w and cos/sin in double.
The rotated output of the oracle is formed in float64 from those cos/sin, y = x*cos +
rotate_half(x)*sin (half-split) or x*cos + rotate_every_two(x)*sin (interleaved).

Tolerances (per element, a and b = the two channels of the element's pair, y = oracle output,
u = 2^-24 = half an ulp of 1 in float32):
  * float32 rounding of cos/sin and of the kernel's products and sum:
        (|a| + |b|) * A * 4u + |y| * 2u
  * "exact": cos/sin of a double angle are within A * 2u of the oracle's double values (one
    rounding to float32 plus the documented 1.2e-7 bound), covered by the term above.
  * "hf": frequencies may differ by the ~1 ulp of float32 pow between torch and libm (checked
    separately: at most 2 ulp); with dw = |w_ropekit - w_oracle| the float32 angles differ by at
    most p*dw + ulp(theta), and the two float32 cos/sin implementations by 2 ulp each:
        (|a| + |b|) * A * (p*dw + 2u*theta + 8u)
  * bf16 / fp16 outputs: plus half an ulp of the output dtype at |y| (one rounding of the
    float32 result), evaluated at |y| + the float32 bound (the rounding may cross a binade).
Pass-through channels [R, D) must be bit-identical.
"""

import json
import math

import numpy as np
import pytest
import torch

from ropekit_import import import_ropekit


ropekit = import_ropekit()

U = 2.0 ** -24
POSITIONS = [0, 1, 2, 7, 4097, 32771, 65539, 131101, 524309, 1048573]

# ------------------------------------------------------------------------------------------------
# Oracle: transformers' init functions, float32 (hf) and float64 (exact).


def _l0(c):
    """original_max_position_embeddings, falling back to max_position_embeddings."""
    return c.get("original_max_position_embeddings") or c["max_position_embeddings"]


def _yarn_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def oracle_attention_factor(c, seq_len):
    t = c["rope_type"]
    if t == "yarn":
        if c.get("attention_factor") is not None:
            return c["attention_factor"]
        if c.get("mscale") and c.get("mscale_all_dim"):
            return _yarn_mscale(c["factor"], c["mscale"]) / _yarn_mscale(c["factor"],
                                                                           c["mscale_all_dim"])
        return _yarn_mscale(c["factor"])
    if t == "longrope":
        if c.get("attention_factor") is not None:
            return c["attention_factor"]
        s = c.get("factor") or c["max_position_embeddings"] / _l0(c)
        return 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(_l0(c)))
    return 1.0


def _yarn_range(c, rd):
    def dim(rot):
        return rd * math.log(_l0(c) / (rot * 2 * math.pi)) / (2 * math.log(c["base"]))

    low, high = dim(c.get("beta_fast", 32.0)), dim(c.get("beta_slow", 1.0))
    if c.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rd - 1)
    if low == high:
        high += 0.001
    return low, high


def oracle_inv_freq_hf(c, seq_len):
    """float32 torch, in transformers' order of operations."""
    rd, base, t = c["rotary_dim"], c["base"], c["rope_type"]
    e = torch.arange(0, rd, 2, dtype=torch.int64).float() / rd
    if t == "ntk":
        base = base * c["ntk_alpha"] ** (rd / (rd - 2))
    if t == "dynamic" and seq_len > c["max_position_embeddings"]:
        f, L = c["factor"], c["max_position_embeddings"]
        s = torch.tensor(seq_len, dtype=torch.int64)
        base = base * ((f * s / L) - (f - 1)) ** (rd / (rd - 2))
    pos_freqs = base ** e
    w = 1.0 / pos_freqs
    if t == "linear":
        w = w / c["factor"]
    elif t == "yarn":
        low, high = _yarn_range(c, rd)
        ramp = torch.clamp((torch.arange(rd // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        interpolation_w = 1.0 / (c["factor"] * pos_freqs)
        w = interpolation_w * (1 - extrapolation) + w * extrapolation
    elif t == "longrope":
        ext = c["long_factor"] if seq_len > _l0(c) else c["short_factor"]
        w = 1.0 / (torch.tensor(ext, dtype=torch.float32) * pos_freqs)
    elif t == "llama3":
        f, lo, hi, L0 = c["factor"], c["low_freq_factor"], c["high_freq_factor"], _l0(c)
        wavelen = 2 * math.pi / w
        w_l = torch.where(wavelen > L0 / lo, w / f, w)
        smooth = (L0 / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * w_l / f + smooth * w_l
        medium = ~(wavelen < L0 / hi) * ~(wavelen > L0 / lo)
        w = torch.where(medium, smoothed, w_l)
    return w.to(torch.float32)


def oracle_inv_freq_exact(c, seq_len):
    """float64 NumPy: the same formulas, every step in double."""
    rd, base, t = c["rotary_dim"], c["base"], c["rope_type"]
    i = np.arange(rd // 2, dtype=np.float64)
    if t == "ntk":
        base = base * c["ntk_alpha"] ** (rd / (rd - 2))
    if t == "dynamic" and seq_len > c["max_position_embeddings"]:
        f, L = c["factor"], c["max_position_embeddings"]
        base = base * (f * seq_len / L - (f - 1)) ** (rd / (rd - 2))
    pos_freqs = base ** (2 * i / rd)
    w = 1.0 / pos_freqs
    if t == "linear":
        w = w / c["factor"]
    elif t == "yarn":
        low, high = _yarn_range(c, rd)
        ramp = np.clip((i - low) / (high - low), 0, 1)
        w = (w / c["factor"]) * ramp + w * (1 - ramp)
    elif t == "longrope":
        ext = c["long_factor"] if seq_len > _l0(c) else c["short_factor"]
        w = 1.0 / (np.asarray(ext, dtype=np.float64) * pos_freqs)
    elif t == "llama3":
        f, lo, hi, L0 = c["factor"], c["low_freq_factor"], c["high_freq_factor"], _l0(c)
        wavelen = 2 * math.pi / w
        w_l = np.where(wavelen > L0 / lo, w / f, w)
        smooth = (L0 / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * w_l / f + smooth * w_l
        medium = ~(wavelen < L0 / hi) & ~(wavelen > L0 / lo)
        w = np.where(medium, smoothed, w_l)
    return w


def oracle_cos_sin(c, positions, numerics, seq_len):
    """float64 (cos, sin), [T, N], A applied, as the oracle of each numerics mode forms them."""
    a = oracle_attention_factor(c, seq_len)
    p = torch.tensor(positions, dtype=torch.int64)
    if numerics == "hf":
        w = oracle_inv_freq_hf(c, seq_len)
        theta = p.float()[:, None] * w[None, :]  # float32 product
        a32 = torch.tensor(a, dtype=torch.float32)
        return (torch.cos(theta) * a32).double(), (torch.sin(theta) * a32).double(), w.double()
    w = torch.from_numpy(oracle_inv_freq_exact(c, seq_len))
    theta = p.double()[:, None] * w[None, :]
    return torch.cos(theta) * a, torch.sin(theta) * a, w


def oracle_rotate(x64, cos, sin, layout, rd):
    """y = x*cos + rotate_half(x)*sin (neox) or x*cos + rotate_every_two(x)*sin (gptj), float64.

    x64 [T, H, D], cos/sin [T, N]. Returns (y, partner) where partner[..., j] is the other
    channel of channel j's pair (for the tolerance)."""
    n = rd // 2
    xr = x64[..., :rd]
    if layout == "neox":
        cc = torch.cat([cos, cos], -1)[:, None, :]
        ss = torch.cat([sin, sin], -1)[:, None, :]
        rot = torch.cat([-xr[..., n:], xr[..., :n]], -1)
    else:
        cc = torch.repeat_interleave(cos, 2, -1)[:, None, :]
        ss = torch.repeat_interleave(sin, 2, -1)[:, None, :]
        rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
    y = x64.clone()
    y[..., :rd] = xr * cc + rot * ss
    return y, rot.abs()


# ------------------------------------------------------------------------------------------------
# Test configurations: one per rope type (dict in Hugging Face key names + rotary_dim).

RNG = np.random.default_rng(20240611)


def _configs(head_dim, rotary_dim):
    n = rotary_dim // 2
    short = list(np.round(RNG.uniform(1.0, 3.0, n), 4))
    long_ = list(np.round(np.linspace(1.0, 40.0, n) * RNG.uniform(0.9, 1.1, n), 4))
    common = dict(head_dim=head_dim, rotary_dim=rotary_dim)
    return {
        "default": dict(common, rope_type="default", base=10000.0,
                        max_position_embeddings=4096),
        "linear": dict(common, rope_type="linear", base=10000.0, factor=2.5,
                       max_position_embeddings=4096),
        "dynamic": dict(common, rope_type="dynamic", base=10000.0, factor=2.0,
                        max_position_embeddings=4096),
        "yarn": dict(common, rope_type="yarn", base=1e6, factor=4.0,
                     original_max_position_embeddings=32768, max_position_embeddings=131072,
                     beta_fast=32.0, beta_slow=1.0),
        "longrope": dict(common, rope_type="longrope", base=10000.0, short_factor=short,
                         long_factor=long_, original_max_position_embeddings=4096,
                         max_position_embeddings=131072),
        "llama3": dict(common, rope_type="llama3", base=500000.0, factor=8.0,
                       low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192, max_position_embeddings=131072),
        "ntk": dict(common, rope_type="ntk", base=10000.0, ntk_alpha=3.0,
                    max_position_embeddings=4096),
    }


GEOMETRIES = {"full": (128, 128), "partial": (96, 48)}
CONFIGS = {(g, t): c for g, (d, r) in GEOMETRIES.items() for t, c in _configs(d, r).items()}


def make_config(c, layout="neox"):
    kwargs = {k: v for k, v in c.items()}
    return ropekit.RopeConfig(layout=layout, **kwargs)


def _ulp_half(y_abs, dtype):
    """Half an ulp of |y| in bf16 / fp16 (normal range; fp16 subnormal floor 2^-24)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.floor(torch.log2(torch.clamp(y_abs, min=2.0 ** -14)))
    return 0.5 * torch.pow(2.0, e - mant)


def check_against_oracle(c, layout, dtype, numerics, positions, heads=3, seq_len=None):
    rd, d = c["rotary_dim"], c["head_dim"]
    t = len(positions)
    x = torch.randn(t, heads, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    cfg = make_config(c, layout)
    out = ropekit.apply_rope(x, torch.tensor(positions), cfg, numerics=numerics, seq_len=seq_len)
    assert out.dtype == dtype and out.shape == x.shape

    s = seq_len if seq_len is not None else max(positions) + 1
    cos, sin, w_ref = oracle_cos_sin(c, positions, numerics, s)
    a = oracle_attention_factor(c, s)
    x64 = x.double()
    y, partner = oracle_rotate(x64, cos, sin, layout, rd)
    pair_abs = x64[..., :rd].abs() + partner

    # float32 arithmetic and rounding of cos/sin, see the module docstring.
    tol = pair_abs * a * 4 * U + y[..., :rd].abs() * 2 * U
    if numerics == "hf":
        w_lib = torch.from_numpy(cfg.inv_freq(seq_len=s, numerics="hf"))
        dw = (w_lib - w_ref).abs()
        # The frequency difference itself is bounded by 2 ulp of float32 (see test_inv_freq_hf).
        assert torch.all(dw <= 2 * 2 * U * w_ref.abs()), (dw / w_ref).max()
        p = torch.tensor(positions, dtype=torch.float64)[:, None]
        theta = p * w_ref[None, :]
        chan = (lambda v: torch.cat([v, v], -1)) if layout == "neox" else (
            lambda v: torch.repeat_interleave(v, 2, -1))
        angle_err = chan(p * dw[None, :] + 2 * U * theta + 8 * U)[:, None, :]
        tol = tol + pair_abs * a * angle_err
    if dtype != torch.float32:
        tol = tol + _ulp_half(y[..., :rd].abs() + tol, dtype)

    err = (out.double()[..., :rd] - y[..., :rd]).abs()
    bad = err > tol
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        pytest.fail(f"{c['rope_type']} {layout} {dtype} {numerics}: {int(bad.sum())} elements "
                    f"out of tolerance; first at {idx} (position {positions[idx[0]]}): "
                    f"got {float(out.double()[idx])}, oracle {float(y[idx])}, "
                    f"err {float(err[idx]):.3g} > tol {float(tol[idx]):.3g}")
    # Pass-through channels are copied bit for bit.
    assert torch.equal(out[..., rd:], x[..., rd:])


@pytest.mark.parametrize("numerics", ["exact", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("key", list(CONFIGS), ids=[f"{g}-{t}" for g, t in CONFIGS])
def test_parity_with_oracle(key, layout, dtype, numerics):
    check_against_oracle(CONFIGS[key], layout, dtype, numerics, POSITIONS)


@pytest.mark.parametrize("numerics", ["exact", "hf"])
@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_types_below_threshold(rope_type, numerics):
    # Positions below the original context: dynamic keeps the default base, longrope the short
    # factors (the oracle switches on the same seq_len = max(positions) + 1).
    c = CONFIGS[("full", rope_type)]
    check_against_oracle(c, "neox", torch.float32, numerics, [0, 5, 99, 1031, 4000])
    # An explicit seq_len pins the frequencies whatever the positions.
    check_against_oracle(c, "neox", torch.float32, numerics, [0, 5, 99, 1031, 4000],
                         seq_len=200003)


@pytest.mark.parametrize("key", list(CONFIGS), ids=[f"{g}-{t}" for g, t in CONFIGS])
def test_inv_freq_and_attention_factor(key):
    c = CONFIGS[key]
    cfg = make_config(c)
    for s in (1, 2048, 200003):
        exact = cfg.inv_freq(seq_len=s)
        ref = oracle_inv_freq_exact(c, s)
        assert exact.dtype == np.float64 and exact.shape == (c["rotary_dim"] // 2,)
        # Double formulas evaluated in different orders: a few ulp of double.
        np.testing.assert_allclose(exact, ref, rtol=64 * 2.0 ** -53, atol=0)
        hf = cfg.inv_freq(seq_len=s, numerics="hf")
        ref_hf = oracle_inv_freq_hf(c, s).double().numpy()
        assert np.all(hf.astype(np.float32) == hf), "hf inverse frequencies must be float32 values"
        # torch's float32 pow is not correctly rounded (~1 ulp): allow 2 ulp after blends.
        np.testing.assert_array_less(np.abs(hf - ref_hf), 2 * 2 * U * ref_hf + 1e-45)
        a = oracle_attention_factor(c, s)
        assert cfg.attention_factor_for(s) == pytest.approx(a, rel=4 * 2.0 ** -52)
        assert cfg.attention_factor_for(s, "hf") == pytest.approx(a, rel=2 * U)


def test_cos_sin_matches_oracle():
    c = CONFIGS[("full", "yarn")]
    cfg = make_config(c)
    cos, sin = cfg.cos_sin(np.array(POSITIONS, dtype=np.int64))
    assert cos.dtype == np.float32 and cos.shape == (len(POSITIONS), 64)
    rc, rs, _ = oracle_cos_sin(c, POSITIONS, "exact", max(POSITIONS) + 1)
    a = oracle_attention_factor(c, max(POSITIONS) + 1)
    np.testing.assert_array_less(np.abs(cos - rc.numpy()), a * 2 * U + 1e-30)
    np.testing.assert_array_less(np.abs(sin - rs.numpy()), a * 2 * U + 1e-30)


def test_numpy_fp32_fp16_match_torch():
    c = CONFIGS[("partial", "llama3")]
    cfg = make_config(c, "gptj")
    x = np.random.default_rng(1).standard_normal((6, 4, 96)).astype(np.float32)
    pos = np.array([3, 1, 4, 1, 5, 131101], dtype=np.int32)
    for dt, tdt in ((np.float32, torch.float32), (np.float16, torch.float16)):
        a = ropekit.apply_rope(x.astype(dt), pos, cfg)
        b = ropekit.apply_rope(torch.from_numpy(x.astype(dt)), torch.from_numpy(pos), cfg)
        assert isinstance(a, np.ndarray) and a.dtype == dt
        assert np.array_equal(a, b.numpy())


# ------------------------------------------------------------------------------------------------
# Configuration from Hugging Face config.json.

LLAMA31 = {
    "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def test_from_hf_config_dict_and_path(tmp_path):
    cfg = ropekit.RopeConfig.from_hf_config(LLAMA31)
    assert (cfg.rope_type, cfg.base, cfg.head_dim, cfg.rotary_dim) == ("llama3", 5e5, 128, 128)
    assert (cfg.factor, cfg.original_max_position_embeddings) == (8.0, 8192)
    assert cfg.layout == "neox" and cfg.num_key_value_heads == 8
    ref = oracle_inv_freq_exact(dict(rope_type="llama3", rotary_dim=128, base=5e5, factor=8.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192,
                                     max_position_embeddings=131072), 0)
    np.testing.assert_allclose(cfg.inv_freq(), ref, rtol=64 * 2.0 ** -53)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31))
    for src in (path, str(path)):
        again = ropekit.RopeConfig.from_hf_config(src)
        assert np.array_equal(again.inv_freq(), cfg.inv_freq())
    phi2 = {"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32,
            "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "max_position_embeddings": 2048}
    assert ropekit.RopeConfig.from_hf_config(phi2).rotary_dim == 32


def test_keyword_constructor_fields():
    cfg = ropekit.RopeConfig(rope_type="yarn", base=150000.0, head_dim=64, factor=32.0,
                             original_max_position_embeddings=4096, truncate=False,
                             max_position_embeddings=131072, layout="gptj")
    assert cfg.layout == "gptj" and cfg.truncate is False and cfg.rotary_dim == 64
    # gpt-oss: A = 0.1 ln 32 + 1.
    assert cfg.attention_factor == pytest.approx(0.1 * math.log(32) + 1, rel=1e-15)
    assert ropekit.RopeConfig(head_dim=80, partial_rotary_factor=0.4).rotary_dim == 32
    assert "yarn" in repr(cfg)


# ------------------------------------------------------------------------------------------------
# Errors: named arguments, never a crash.


def _raises(exc, fragment, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert fragment in str(info.value), str(info.value)


def test_config_errors(tmp_path):
    rc = ropekit.RopeConfig
    _raises(ValueError, "base", rc, head_dim=64, base=float("nan"))
    _raises(ValueError, "factor", rc, head_dim=64, rope_type="linear", factor=float("inf"))
    _raises(ValueError, "factor", rc, head_dim=64, rope_type="linear")  # required
    _raises(ValueError, "rope_type", rc, head_dim=64, rope_type="spiral")
    _raises(ValueError, "rotary_dim", rc, head_dim=64, rotary_dim=65)
    _raises(ValueError, "layout", rc, head_dim=64, layout="diagonal")
    _raises(ValueError, "rope_theta", ropekit.RopeConfig.from_hf_config,
            dict(LLAMA31, rope_theta=-1.0))
    missing = str(tmp_path / "nope.json")
    _raises(ValueError, missing, ropekit.RopeConfig.from_hf_config, missing)
    _raises(TypeError, "from_hf_config", ropekit.RopeConfig.from_hf_config, 42)
    cfg = rc(head_dim=64)
    _raises(ValueError, "numerics", cfg.inv_freq, numerics="fast")
    _raises(ValueError, "seq_len", cfg.inv_freq, seq_len=-1)


def test_apply_errors():
    cfg = ropekit.RopeConfig(head_dim=64)
    x = np.zeros((4, 2, 64), np.float32)
    pos = np.arange(4)
    ap = ropekit.apply_rope
    _raises(TypeError, "x", ap, x.astype(np.int32), pos, cfg)
    _raises(TypeError, "x", ap, x.tolist(), pos, cfg)
    _raises(TypeError, "x", ap, torch.zeros(4, 2, 64, dtype=torch.int64), pos, cfg)
    _raises(ValueError, "x must be", ap, x[0], pos, cfg)
    _raises(ValueError, "head_dim", ap, np.zeros((4, 2, 32), np.float32), pos, cfg)
    _raises(ValueError, "positions", ap, x, np.arange(5), cfg)
    _raises(TypeError, "positions", ap, x, np.arange(4.0), cfg)
    _raises(TypeError, "positions", ap, x, [0.5, 1, 2, 3], cfg)
    _raises(ValueError, "positions[2] = -1", ap, x, np.array([0, 1, -1, 3]), cfg)
    _raises(ValueError, "positions[3] = 2147483648", ap, x, np.array([0, 1, 2, 2 ** 31]), cfg)
    _raises(ValueError, "meta", ap, torch.empty(4, 2, 64, device="meta"), pos, cfg)
    _raises(ValueError, "positions", ap, torch.zeros(4, 2, 64), torch.empty(4, dtype=torch.int64,
                                                                            device="meta"), cfg)
    _raises(ValueError, "numerics", ap, x, pos, cfg, numerics="approx")
    _raises(ValueError, "layout", ap, x, pos, cfg, layout="spiral")
    _raises(ValueError, "num_threads", ap, x, pos, cfg, num_threads=0)
    _raises(TypeError, "config", ap, x, pos, {"head_dim": 64})
    ro = x.copy()
    ro.setflags(write=False)
    _raises(ValueError, "read-only", ap, ro, pos, cfg, inplace=True)
    _raises(ValueError, "requires grad", ap, torch.zeros(4, 2, 64, requires_grad=True), pos, cfg)
    _raises(TypeError, "dtype", ropekit.apply_rope_qk, x, x.astype(np.float16), pos, cfg)
    _raises(ValueError, "tokens", ropekit.apply_rope_qk, x, x[:3], pos, cfg)
