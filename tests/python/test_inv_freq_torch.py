"""Inverse frequencies and attention factors of `ropekit inspect` against independent oracles.

* `--numerics hf` against a PyTorch (float32, CPU) re-implementation of transformers' init
  functions, written here from the published formulas and the float32 operation order
  (default, linear, dynamic, yarn with mscale / mscale_all_dim / truncate, longrope short and
  long, llama3, partial rotary). Two variants of the oracle:
    - `pow="torch"`: torch's own float32 pow, exactly what transformers runs on this machine.
      torch's vectorised pow is within 1 ulp of the correctly rounded value; a 1-ulp change of
      the power is a relative change of up to 2^-23, which after the following rounded
      operations (reciprocal, product with a factor, blend) is at most 2 ulps of the result.
    - `pow="cr"`: the same chain with the pow correctly rounded (a double pow rounded once), the
      recommendation ropekit follows; every other step is an IEEE float32 operation, so the result
      must agree to within 1 ulp (and in practice bit for bit).
* `--numerics exact` against an mpmath evaluation of the formulas at 50 digits. ropekit carries
  the formulas in extended precision (11 more bits than double) and rounds once, so each inverse
  frequency must be within 1 double ulp (0.5 for the final rounding plus the intermediate
  roundings scaled down by 2^-11, times condition numbers of at most ~12); the attention factor
  is a handful of double operations (log, products, sqrt): <= 4 double ulps. YaRN's correction range and llama3's band edges are configuration constants
  that transformers forms in Python doubles; the oracle forms them the same way.

Dimension legend: D = head_dim, R = rotary_dim, N = R / 2 pairs.
"""

import json
import math
import os
import pathlib
import random
import subprocess

import mpmath
import numpy as np
import pytest
import torch

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError(
        "ROPEKIT_CLI is not set: point it at the built `ropekit` binary "
        "(ctest sets it; by hand: ROPEKIT_CLI=build/release/tools/ropekit)")

mpmath.mp.dps = 50
F32 = np.float32


# ---- configs -----------------------------------------------------------------------------------

def _factor_lists(n, seed):
    rng = random.Random(seed)
    short = sorted(1.0 + rng.random() * 0.2 for _ in range(n))
    long_ = sorted(1.0 + rng.random() * 40.0 for _ in range(n))
    return short, long_


def make_configs():
    """(name, config dict, seq_len) over several bases, head dims and partial factors."""
    out = []
    for base in (1e4, 5e5, 1e6):
        for head_dim in (64, 80, 96, 128):
            for partial in (1.0, 0.5, 0.75, 0.25):
                rd = int(head_dim * partial)
                if rd % 2 or rd < 4:
                    continue
                common = {"model_type": "llama", "head_dim": head_dim, "hidden_size": head_dim * 8,
                          "num_attention_heads": 8, "rope_theta": base,
                          "partial_rotary_factor": partial, "max_position_embeddings": 4096}
                tag = f"b{base:g}-d{head_dim}-p{partial}"
                out.append((f"default-{tag}", dict(common), 0))
                out.append((f"linear-{tag}", dict(common, rope_scaling={
                    "rope_type": "linear", "factor": 2.5}), 0))
                out.append((f"dynamic-{tag}", dict(common, rope_scaling={
                    "rope_type": "dynamic", "factor": 2.1}), 32771))
                out.append((f"dynamic-short-{tag}", dict(common, rope_scaling={
                    "rope_type": "dynamic", "factor": 2.1}), 4096))
                out.append((f"yarn-{tag}", dict(common, max_position_embeddings=16384, rope_scaling={
                    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}), 0))
                out.append((f"yarn-mscale-{tag}", dict(common, rope_scaling={
                    "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 1024,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 0}), 0))
                out.append((f"yarn-notrunc-{tag}", dict(common, rope_scaling={
                    "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 512,
                    "beta_fast": 16, "beta_slow": 2, "truncate": False}), 0))
                short, long_ = _factor_lists(rd // 2, seed=rd * 7 + head_dim)
                lr = dict(common, max_position_embeddings=131072,
                          original_max_position_embeddings=4096,
                          rope_scaling={"type": "longrope", "short_factor": short,
                                        "long_factor": long_})
                out.append((f"longrope-short-{tag}", lr, 4096))
                out.append((f"longrope-long-{tag}", lr, 131101))
                out.append((f"llama3-{tag}", dict(common, max_position_embeddings=131072, rope_scaling={
                    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), 0))
    return out


CONFIGS = make_configs()


def run_inspect(tmp_path, name, cfg, seq_len, numerics):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    cmd = [CLI, "inspect", str(path), "--json", "--numerics", numerics, "--seq-len", str(seq_len)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return json.loads(res.stdout)


# ---- the PyTorch oracle (transformers' float32 order) --------------------------------------------

def rope_dims(cfg):
    head_dim = cfg["head_dim"]
    return head_dim, int(head_dim * cfg.get("partial_rotary_factor", 1.0))


def pow_fn(kind):
    if kind == "torch":
        return lambda base, e: base ** e
    # Correctly rounded: fl32(base) raised in double, rounded once to float32.
    return lambda base, e: (torch.tensor(base, dtype=torch.float32).double() ** e.double()).float()


def torch_inv_freq(cfg, seq_len, kind):
    """Returns (inv_freq float32 tensor, attention factor as a Python float)."""
    pw = pow_fn(kind)
    _, dim = rope_dims(cfg)
    base = cfg["rope_theta"]
    rs = cfg.get("rope_scaling") or {}
    rtype = rs.get("rope_type", rs.get("type", "default"))
    mpe = cfg["max_position_embeddings"]
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rtype == "default":
        return 1.0 / pw(base, exps), 1.0
    if rtype == "linear":
        inv = 1.0 / pw(base, exps)
        inv /= rs["factor"]
        return inv, 1.0
    if rtype == "dynamic":
        factor = rs["factor"]
        if seq_len <= mpe:
            return 1.0 / pw(base, exps), 1.0
        s = torch.maximum(torch.tensor(seq_len), torch.tensor(mpe))
        new_base = base * ((factor * s / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / pw(new_base.item() if kind == "cr" else new_base, exps), 1.0
    if rtype == "yarn":
        factor = rs["factor"]
        l0 = cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings") or mpe

        def g(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = rs.get("attention_factor")
        if att is None:
            if rs.get("mscale") and rs.get("mscale_all_dim"):
                att = float(g(factor, rs["mscale"]) / g(factor, rs["mscale_all_dim"]))
            else:
                att = g(factor)
        low, high = yarn_range(cfg, dim)
        pos = pw(base, exps)
        extrap = 1.0 / pos
        interp = 1.0 / (factor * pos)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp
        return interp * (1 - keep) + extrap * keep, att
    if rtype in ("longrope", "su"):
        l0 = cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings") or mpe
        factor = rs.get("factor") or mpe / l0
        att = rs.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(l0))
        ext = rs["long_factor"] if seq_len and seq_len > l0 else rs["short_factor"]
        ext = torch.tensor(ext, dtype=torch.float32)
        return 1.0 / (ext * pw(base, exps)), att
    if rtype == "llama3":
        inv = 1.0 / pw(base, exps)
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        l0 = cfg.get("original_max_position_embeddings") or rs["original_max_position_embeddings"]
        low_wl, high_wl = l0 / lo, l0 / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (l0 / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) * ~(wl > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    raise AssertionError(rtype)


def yarn_range(cfg, dim):
    """transformers' correction range, in Python doubles."""
    rs = cfg["rope_scaling"]
    base = cfg["rope_theta"]
    l0 = cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def corr(rot):
        return (dim * math.log(l0 / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


# ---- the mpmath oracle (exact formulas) ----------------------------------------------------------

def mp_inv_freq(cfg, seq_len):
    mp = mpmath.mpf
    _, dim = rope_dims(cfg)
    base = mp(cfg["rope_theta"])
    rs = cfg.get("rope_scaling") or {}
    rtype = rs.get("rope_type", rs.get("type", "default"))
    mpe = cfg["max_position_embeddings"]

    def default(b):
        return [1 / mpmath.power(b, mp(2 * i) / dim) for i in range(dim // 2)]

    if rtype == "default":
        return default(base), mp(1)
    if rtype == "linear":
        return [w / mp(rs["factor"]) for w in default(base)], mp(1)
    if rtype == "dynamic":
        if seq_len <= mpe:
            return default(base), mp(1)
        f = mp(rs["factor"])
        grown = base * mpmath.power(f * seq_len / mpe - (f - 1), mp(dim) / (dim - 2))
        return default(grown), mp(1)
    if rtype == "yarn":
        s = mp(rs["factor"])

        def g(scale, m=1):
            return mp(1) if scale <= 1 else mp("0.1") * mp(m) * mpmath.log(scale) + 1

        if rs.get("mscale") and rs.get("mscale_all_dim"):
            att = g(s, rs["mscale"]) / g(s, rs["mscale_all_dim"])
        else:
            att = g(s)
        low, high = yarn_range(cfg, dim)
        if low == high:
            high += 0.001
        out = []
        for i, w in enumerate(default(base)):
            r = min(max((mp(i) - mp(low)) / (mp(high) - mp(low)), mp(0)), mp(1))
            keep = 1 - r
            out.append(w / s * (1 - keep) + w * keep)
        return out, att
    if rtype in ("longrope", "su"):
        l0 = cfg.get("original_max_position_embeddings") or mpe
        s = mp(mpe) / l0
        att = mp(1) if s <= 1 else mpmath.sqrt(1 + mpmath.log(s) / mpmath.log(l0))
        ext = rs["long_factor"] if seq_len and seq_len > l0 else rs["short_factor"]
        return [w / mp(e) for w, e in zip(default(base), ext)], att
    if rtype == "llama3":
        f, lo, hi = mp(rs["factor"]), mp(rs["low_freq_factor"]), mp(rs["high_freq_factor"])
        l0 = mp(rs["original_max_position_embeddings"])
        out = []
        for w in default(base):
            wl = 2 * mpmath.pi / w
            if wl < l0 / hi:
                out.append(w)
            elif wl > l0 / lo:
                out.append(w / f)
            else:
                sm = (l0 / wl - lo) / (hi - lo)
                out.append((1 - sm) * w / f + sm * w)
        return out, mp(1)
    raise AssertionError(rtype)


# ---- tests ---------------------------------------------------------------------------------------

def f32_ulps(a, b):
    """Distance in float32 ulps between float32 values a and b (arrays)."""
    ia = np.asarray(a, dtype=np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.abs(ia - ib)


def _type_of(name):
    return name.split("-")[0]


@pytest.mark.parametrize("name,cfg,seq_len", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hf_numerics_match_torch(tmp_path, name, cfg, seq_len):
    got = run_inspect(tmp_path, name, cfg, seq_len, "hf")
    head_dim, dim = rope_dims(cfg)
    assert got["head_dim"] == head_dim and got["rotary_dim"] == dim
    assert got["numerics"] == "hf"
    ours = np.array(got["inv_freq"], dtype=np.float64)
    assert len(ours) == dim // 2
    # Every entry is a float32 value.
    assert np.array_equal(ours.astype(np.float32).astype(np.float64), ours)

    for kind, max_ulps in (("cr", 1), ("torch", 2)):
        ref, att = torch_inv_freq(cfg, seq_len, kind)
        ulps = f32_ulps(ours, ref.numpy())
        assert ulps.max() <= max_ulps, (kind, name, int(ulps.argmax()), int(ulps.max()))
        # The attention factor is the Python double rounded to float32.
        assert got["attention_factor"] == float(F32(att)), (got["attention_factor"], att)


@pytest.mark.parametrize("name,cfg,seq_len", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_exact_numerics_match_mpmath(tmp_path, name, cfg, seq_len):
    got = run_inspect(tmp_path, name, cfg, seq_len, "exact")
    ref, att = mp_inv_freq(cfg, seq_len)
    assert len(got["inv_freq"]) == len(ref)
    for i, (w, r) in enumerate(zip(got["inv_freq"], ref)):
        err = abs(mpmath.mpf(w) - r)
        assert err <= math.ulp(float(r)), (name, i, w, float(r), float(err / math.ulp(float(r))))
    assert abs(mpmath.mpf(got["attention_factor"]) - att) <= 4 * math.ulp(float(att)), (
        name, got["attention_factor"], float(att))


def test_wavelength_and_json_fields(tmp_path):
    name, cfg, seq_len = CONFIGS[0]
    got = run_inspect(tmp_path, name, cfg, seq_len, "exact")
    for key in ("rope_type", "head_dim", "rotary_dim", "base", "attention_factor", "inv_freq",
                "layout", "numerics", "wavelength", "max_position_embeddings"):
        assert key in got, key
    for w, wl in zip(got["inv_freq"], got["wavelength"]):
        assert abs(wl - 2 * math.pi / w) <= 2 * math.ulp(wl)


def test_missing_file_is_one_line_error(tmp_path):
    res = subprocess.run([CLI, "inspect", str(tmp_path / "absent.json")], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "cannot open" in res.stderr


def test_invalid_factor_names_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model_type": "llama", "head_dim": 64, "rope_theta": 1e4,
                                "rope_scaling": {"rope_type": "linear", "factor": 0.5}}))
    res = subprocess.run([CLI, "inspect", str(path), "--json"], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 1
    assert "rope_scaling.factor must be a finite number >= 1 (got 0.5)" in res.stderr
    assert res.stdout == ""


EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[2] / "examples").glob("*.json"))


def test_examples_present():
    assert len(EXAMPLES) >= 6, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_bundled_examples_match_oracle(path):
    cfg = json.loads(path.read_text())
    res = subprocess.run([CLI, "inspect", str(path), "--json", "--numerics", "hf"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    if "text_config" in cfg:  # vision-language config (Qwen3-VL): the language model's fields
        cfg = dict(cfg["text_config"])
    if (cfg.get("rope_scaling") or {}).get("type") == "mrope":  # Qwen2-VL: default frequencies
        cfg = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    if cfg.get("model_type") == "gptj":
        # GPT-J: rotary_dim of n_embd / n_head, base fixed at 10000, interleaved pairs.
        assert (got["head_dim"], got["rotary_dim"], got["base"], got["layout"]) == (256, 64, 1e4, "gptj")
        cfg = {"head_dim": 64, "rope_theta": 1e4, "max_position_embeddings": 2048}
    elif cfg.get("model_type") == "gpt_neox":
        assert (got["head_dim"], got["rotary_dim"]) == (96, 24)
        cfg = {"head_dim": 96, "partial_rotary_factor": 0.25, "rope_theta": cfg["rotary_emb_base"],
               "max_position_embeddings": 2048}
    elif "rope_parameters" in cfg:
        full = cfg["rope_parameters"]["full_attention"]
        cfg = dict(cfg, rope_theta=full["rope_theta"], rope_scaling=full)
    else:
        cfg = dict(cfg)
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    ref, att = torch_inv_freq(cfg, 0, "cr")
    assert f32_ulps(np.array(got["inv_freq"]), ref.numpy()).max() <= 1, path.name
    assert got["attention_factor"] == float(F32(att))


def test_llama31_bands_published(tmp_path):
    # Llama-3.1-8B: pairs 0-28 unchanged, 29-34 smoothed, 35-63 divided by 8.
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
           "max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    for numerics in ("exact", "hf"):
        got = run_inspect(tmp_path, "llama31", cfg, 0, numerics)
        assert got["bands"] == "0-28 kept, 29-34 smoothed, 35-63 interpolated"
        assert got["scaling"][28] == "kept" and got["scaling"][35] == "interpolated"
