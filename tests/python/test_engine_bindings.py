"""Multimodal positions (M-RoPE), the fused KV-cache append and the context shift from Python.

The M-RoPE oracle is written here in PyTorch float64 from transformers' semantics:
* Qwen2-VL `apply_multimodal_rotary_pos_emb`: cos/sin of every axis over the full head
  (emb = cat(freqs, freqs)), split along the channels into mrope_section * 2 chunks, chunk j taken
  from axis j % 3, then x * cos + rotate_half(x) * sin;
* Qwen3-VL `apply_interleaved_mrope`: freqs of axis 0, overwritten for axis a in {1, 2} at pair
  indices a, a + 3, ... below 3 * mrope_section[a], before the cat.
Nothing is taken from ropekit except its output.

Tolerances: the kernel computes in float32 with cos/sin rounded once to float32 (|err| <= 2^-24 A)
and one product rounding plus one fused add (2^-23 (|a c| + |b s|)), so per output channel
|err| <= 3 * 2^-24 * A * (|x_a| + |x_b|) (+ half an ulp of the storage type for 16-bit).
"""

import math

import numpy as np
import pytest
import torch

from ropekit_import import import_ropekit

rk = import_ropekit()

QWEN2_VL = {
    "model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28,
    "num_key_value_heads": 4, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
QWEN3_VL = {
    "model_type": "qwen3_vl",
    "text_config": {"hidden_size": 4096, "head_dim": 128, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "rope_theta": 5000000,
                    "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                     "mrope_interleaved": True}},
}


def rotate_half(x):
    n = x.shape[-1] // 2
    return torch.cat((-x[..., n:], x[..., :n]), dim=-1)


def oracle_mrope(x, positions, base, sections, interleaved):
    """x: float64 [T, H, D]; positions: int [3, T]. Returns float64 [T, H, D]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [N]
    freqs = positions.to(torch.float64)[:, :, None] * inv_freq[None, None, :]  # [3, T, N]
    if interleaved:
        f = freqs[0].clone()
        for axis in (1, 2):
            idx = slice(axis, 3 * sections[axis], 3)
            f[..., idx] = freqs[axis, ..., idx]
        emb = torch.cat((f, f), dim=-1)  # [T, D]
        cos, sin = emb.cos(), emb.sin()
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # [3, T, D]
        cos_all, sin_all = emb.cos(), emb.sin()
        chunks = list(sections) * 2
        cos = torch.cat([m[i % 3] for i, m in enumerate(cos_all.split(chunks, dim=-1))], dim=-1)
        sin = torch.cat([m[i % 3] for i, m in enumerate(sin_all.split(chunks, dim=-1))], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def bound(x64):
    """3 * 2^-24 * (|x_a| + |x_b|) per channel of a half-split head (A = 1)."""
    n = x64.shape[-1] // 2
    pair = x64[..., :n].abs() + x64[..., n:].abs()
    return 3 * 2.0**-24 * torch.cat((pair, pair), dim=-1) * 1.01


@pytest.mark.parametrize("cfg,sections,interleaved,base",
                         [(QWEN2_VL, [16, 24, 24], False, 1e6), (QWEN3_VL, [24, 20, 20], True, 5e6)])
def test_mrope_matches_float64_oracle(cfg, sections, interleaved, base):
    config = rk.RopeConfig.from_hf_config(cfg)
    assert list(config.mrope_section) == sections
    assert config.mrope_interleaved == interleaved
    g = torch.Generator().manual_seed(0)
    T, H = 19, 3
    x = torch.randn(T, H, 128, generator=g)
    pos = torch.randint(0, 60000, (3, T), generator=g)
    pos[:, 0] = torch.tensor([0, 5, 9])
    got = rk.apply_rope(x, pos, config)
    want = oracle_mrope(x.double(), pos, base, sections, interleaved)
    assert torch.all((got.double() - want).abs() <= bound(x.double())), "float32 torch"
    # NumPy, int32 positions, batched [A, B, T] positions.
    got_np = rk.apply_rope(x.numpy(), pos.numpy().astype(np.int32), config)
    assert np.array_equal(got_np, got.numpy())
    xb = torch.stack([x, x.flip(0)])
    pb = torch.stack([pos, pos.flip(1)], dim=1)  # [3, 2, T]
    got_b = rk.apply_rope(xb, pb, config)
    assert torch.equal(got_b[0], got)
    want_b1 = oracle_mrope(x.flip(0).double(), pos.flip(1), base, sections, interleaved)
    assert torch.all((got_b[1].double() - want_b1).abs() <= bound(x.flip(0).double()))


def test_mrope_equal_axes_bit_identical_to_text_rope_and_shape_errors():
    config = rk.RopeConfig.from_hf_config(QWEN2_VL)
    text = rk.RopeConfig(head_dim=128, base=1e6)
    x = torch.randn(7, 2, 128).to(torch.bfloat16)
    p = torch.arange(100, 107)
    assert torch.equal(rk.apply_rope(x, p.expand(3, 7), config), rk.apply_rope(x, p, text))
    with pytest.raises(ValueError, match=r"3 position axes.*\(3, T\)"):
        rk.apply_rope(x, p, config)
    with pytest.raises(ValueError, match=r"positions has shape \(3, 7\)"):
        rk.apply_rope(x, p.expand(3, 7), text)
    with pytest.raises(TypeError, match="float64"):
        rk.apply_rope(x.double(), p.expand(3, 7), config)
    with pytest.raises(ValueError, match="mrope_section"):
        rk.RopeConfig(head_dim=128, mrope_section=[16, 24, 20])


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("paged", [False, True])
def test_rope_and_append_bit_identical_to_rotate_then_copy(lib, paged):
    config = rk.RopeConfig(head_dim=64, rope_type="yarn", factor=4.0,
                           original_max_position_embeddings=4096)
    rng = np.random.default_rng(1)
    T, H, Hkv, D = 5, 4, 2, 64
    q = rng.standard_normal((T, H, D), dtype=np.float32)
    k = rng.standard_normal((T, Hkv, D), dtype=np.float32)
    v = rng.standard_normal((T, Hkv, D), dtype=np.float32)
    shape = (6, 4, Hkv, D) if paged else (24, Hkv, D)
    cache_k = rng.standard_normal(shape, dtype=np.float32)
    cache_v = rng.standard_normal(shape, dtype=np.float32)
    positions = np.array([10, 11, 12, 13, 300])
    slots = np.array([9, 0, -1, 23, 4])
    want_q = rk.apply_rope(q, positions, config)
    want_k_rot = rk.apply_rope(k, positions, config)
    want_k, want_v = cache_k.copy(), cache_v.copy()
    flat_k, flat_v = want_k.reshape(24, Hkv, D), want_v.reshape(24, Hkv, D)
    for t, s in enumerate(slots):
        if s >= 0:
            flat_k[s] = want_k_rot[t]
            flat_v[s] = v[t]
    conv = (lambda a: torch.from_numpy(a)) if lib == "torch" else (lambda a: a)
    qq, ck, cv = conv(q.copy()), conv(cache_k), conv(cache_v)
    out = rk.apply_rope_and_append(qq, conv(k), conv(v), positions, ck, cv, slots, config)
    assert out is qq
    asnp = (lambda a: a.numpy()) if lib == "torch" else (lambda a: a)
    assert np.array_equal(asnp(qq), want_q)
    assert np.array_equal(asnp(ck), want_k)
    assert np.array_equal(asnp(cv), want_v)
    with pytest.raises(ValueError, match="repeats an earlier slot"):
        rk.apply_rope_and_append(qq, conv(k), conv(v), positions, ck, cv, np.array([1, 1, 2, 3, 4]),
                                 config)
    with pytest.raises(ValueError, match=r"slots has shape \(2,\)"):
        rk.apply_rope_and_append(qq, conv(k), conv(v), positions, ck, cv, np.array([1, 2]), config)
    with pytest.raises(TypeError, match="must match"):
        rk.apply_rope_and_append(qq, conv(k.astype(np.float16)), conv(v), positions, ck, cv, slots,
                                 config)


def test_shift_keys_matches_rotation_at_shifted_positions():
    # Bound (see tests/kv_cache_test.cc): |shifted - fresh| <= 12 sqrt(2) 2^-24 A r per channel,
    # r = |(x_a, x_b)|.
    config = rk.RopeConfig(head_dim=64, rope_type="yarn", factor=4.0,
                           original_max_position_embeddings=4096)
    A = config.attention_factor
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 2, 64), dtype=np.float32)
    pos = 1000 + 500 * np.arange(9)
    for delta in (-700, 3, 20000):
        cache = rk.apply_rope(x, pos, config)
        fresh = rk.apply_rope(x, pos + delta, config)
        t = torch.from_numpy(cache.copy())
        assert rk.shift_keys(t, delta, config) is t
        r = np.hypot(x[..., :32], x[..., 32:]).astype(np.float64)
        tol = 12 * math.sqrt(2) * 2.0**-24 * A * np.concatenate((r, r), axis=-1)
        assert np.all(np.abs(t.numpy().astype(np.float64) - fresh) <= tol), delta
        # Slots subset: only those rows move.
        part = cache.copy()
        rk.shift_keys(part, delta, config, slots=np.array([0, 4]))
        assert np.array_equal(part[[0, 4]], t.numpy()[[0, 4]])
        assert np.array_equal(part[[1, 2, 3]], cache[[1, 2, 3]])
    with pytest.raises(ValueError, match="M-RoPE"):
        rk.shift_keys(cache, 1, rk.RopeConfig.from_hf_config(QWEN2_VL))
