"""Python bindings: memory handling (in-place aliasing, strided views, q/k with different head
counts, batches, threads) and the ropekit.torch autograd module (gradcheck in double, HF-style
attention usage), against an independent float64 rotation written here from the RoFormer /
Hugging Face formulas.
"""

import concurrent.futures

import numpy as np
import pytest
import torch

from ropekit_import import import_ropekit


ropekit = import_ropekit("torch")
U = 2.0 ** -24


def ref_rotate(x, positions, base, rd, layout, inverse=False):
    """float64 oracle: HF rotate_half / rotate_every_two with w_i = base^(-2i/R), angles in
    double. x [..., T, H, D] token-major; positions [T] or broadcastable [..., T]."""
    x = x.double()
    n = rd // 2
    w = base ** (-torch.arange(n, dtype=torch.float64) * 2 / rd)
    theta = torch.as_tensor(positions).double()[..., None] * w  # [..., T, N]
    if inverse:
        theta = -theta
    cos, sin = torch.cos(theta)[..., None, :], torch.sin(theta)[..., None, :]
    xr = x[..., :rd]
    if layout == "neox":
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        rot = torch.cat([-xr[..., n:], xr[..., :n]], -1)
    else:
        cos = torch.repeat_interleave(cos, 2, -1)
        sin = torch.repeat_interleave(sin, 2, -1)
        rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
    return torch.cat([xr * cos + rot * sin, x[..., rd:]], -1)


def assert_close_fp32(out, ref, x):
    # float32 cos/sin (one rounding each) and float32 products/sum: |a|+|b| <= 2 max|x|.
    bound = 2 * x.double().abs().amax(-1, keepdim=True) * 4 * U + ref.abs() * 2 * U
    err = (out.double() - ref).abs()
    assert torch.all(err <= bound), float((err - bound).max())


CFG = ropekit.RopeConfig(head_dim=64, base=10000.0)
CFG_PARTIAL = ropekit.RopeConfig(head_dim=80, rotary_dim=32, base=10000.0, layout="gptj")
POS = [3, 0, 4097, 32771, 131101, 1048573, 17]


# ------------------------------------------------------------------------------------------------
# Aliasing and strides.


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_inplace_equals_out_of_place(kind):
    x = torch.randn(len(POS), 4, 64)
    pos = torch.tensor(POS)
    if kind == "numpy":
        x, pos = x.numpy(), pos.numpy()
    before = x.copy() if kind == "numpy" else x.clone()
    out = ropekit.apply_rope(x, pos, CFG)
    # Out of place: a new buffer; the input is left bit-for-bit untouched.
    assert out is not x
    assert (np.array_equal(x, before) if kind == "numpy" else torch.equal(x, before))
    res = ropekit.apply_rope(x, pos, CFG, inplace=True)
    assert res is x
    assert (np.array_equal(x, out) if kind == "numpy" else torch.equal(x, out))
    assert_close_fp32(torch.as_tensor(out), ref_rotate(torch.as_tensor(before), POS, 1e4, 64,
                                                       "neox"), torch.as_tensor(before))


def test_out_argument_and_backward_inverts():
    x = torch.randn(len(POS), 2, 80)
    out = torch.empty_like(x)
    res = ropekit.apply_rope(x, POS, CFG_PARTIAL, out=out)
    assert res is out
    assert_close_fp32(out, ref_rotate(x, POS, 1e4, 32, "gptj"), x)
    back = ropekit.apply_rope_backward(out, POS, CFG_PARTIAL)
    assert_close_fp32(back, ref_rotate(out, POS, 1e4, 32, "gptj", inverse=True), out)
    # R^T R = I up to float32 rounding of two rotations.
    assert torch.allclose(back, x, rtol=0, atol=float(x.abs().max()) * 32 * U)


@pytest.mark.parametrize("inplace", [False, True])
def test_fused_qkv_slices(inplace):
    t, h, hkv, d = len(POS), 8, 2, 64
    qkv = torch.randn(t, (h + 2 * hkv) * d)
    original = qkv.clone()
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    q_ref = ropekit.apply_rope(q.contiguous(), POS, CFG)
    k_ref = ropekit.apply_rope(k.contiguous(), POS, CFG)
    q_out, k_out = ropekit.apply_rope_qk(q, k, POS, CFG, inplace=inplace)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    v_cols = slice((h + hkv) * d, None)
    assert torch.equal(qkv[:, v_cols], original[:, v_cols])  # v never written
    if inplace:
        assert q_out.data_ptr() == q.data_ptr() and torch.equal(q, q_ref)
    else:
        assert torch.equal(qkv, original)


def test_numpy_strided_views():
    t, h, d = len(POS), 6, 64
    fused = np.random.default_rng(3).standard_normal((t, 3 * h, d)).astype(np.float32)
    q = fused[:, h: 2 * h, :]  # middle third, strided over tokens
    ref = ropekit.apply_rope(np.ascontiguousarray(q), POS, CFG)
    assert np.array_equal(ropekit.apply_rope(q, POS, CFG), ref)
    # Reversed token order (negative stride) is copied for out-of-place rotation ...
    rev = q[::-1]
    assert np.array_equal(ropekit.apply_rope(rev, POS[::-1], CFG), ref[::-1])
    # ... and refused in place.
    with pytest.raises(ValueError, match="x"):
        ropekit.apply_rope(rev, POS[::-1], CFG, inplace=True)
    ropekit.apply_rope(q, POS, CFG, inplace=True)
    assert np.array_equal(fused[:, h: 2 * h], ref)


def test_head_major_views():
    x_thd = torch.randn(len(POS), 5, 64)
    ref = ropekit.apply_rope(x_thd, POS, CFG)
    # The same data seen as [H, T, D] (a transposed view) and a contiguous [H, T, D] copy.
    for x_htd in (x_thd.transpose(0, 1), x_thd.transpose(0, 1).contiguous()):
        out = ropekit.apply_rope(x_htd, POS, CFG, head_major=True)
        assert out.shape == x_htd.shape
        assert torch.equal(out.transpose(0, 1), ref)


def test_last_dim_not_contiguous():
    base = torch.randn(len(POS), 64, 3)  # [T, D, H] storage
    x = base.transpose(1, 2)  # [T, H, D] with channel stride 3
    assert x.stride(-1) != 1
    assert torch.equal(ropekit.apply_rope(x, POS, CFG), ropekit.apply_rope(x.contiguous(), POS,
                                                                           CFG))
    with pytest.raises(ValueError, match="last dimension"):
        ropekit.apply_rope(x, POS, CFG, inplace=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_q_and_k_with_different_head_counts(dtype):
    q = torch.randn(len(POS), 32, 64).to(dtype)
    k = torch.randn(len(POS), 8, 64).to(dtype)
    q_out, k_out = ropekit.apply_rope_qk(q, k, torch.tensor(POS, dtype=torch.int32), CFG)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    assert torch.equal(q_out, ropekit.apply_rope(q, POS, CFG))
    assert torch.equal(k_out, ropekit.apply_rope(k, POS, CFG))


def test_batched_positions_and_thread_counts():
    b, t = 3, 40
    x = torch.randn(b, t, 4, 64)
    pos = torch.stack([torch.arange(t) + off for off in (0, 1000, 131101)])
    out1 = ropekit.apply_rope(x, pos, CFG, num_threads=1)
    for n in (2, 3, 8):
        assert torch.equal(ropekit.apply_rope(x, pos, CFG, num_threads=n), out1)
    for i in range(b):
        assert torch.equal(out1[i], ropekit.apply_rope(x[i], pos[i], CFG))
        assert_close_fp32(out1[i], ref_rotate(x[i], pos[i], 1e4, 64, "neox"), x[i])


def test_concurrent_calls_share_tables():
    cfg = ropekit.RopeConfig(head_dim=128, base=5e5)
    xs = [torch.randn(256, 8, 128) for _ in range(8)]
    pos = torch.arange(256) * 37
    expected = [ropekit.apply_rope(x, pos, cfg, num_threads=1) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: ropekit.apply_rope(x, pos, cfg, num_threads=2), xs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_empty_inputs():
    x = torch.randn(0, 4, 64)
    assert ropekit.apply_rope(x, torch.zeros(0, dtype=torch.int64), CFG).shape == (0, 4, 64)


# ------------------------------------------------------------------------------------------------
# Autograd module.


@pytest.mark.parametrize("cfg,rd,layout", [(CFG, 64, "neox"), (CFG_PARTIAL, 32, "gptj")])
def test_gradcheck_double(cfg, rd, layout):
    d = cfg.head_dim
    q = torch.randn(2, 2, 3, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, d, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1, 4097], [32771, 131101, 1048573]])
    rotary = ropekit.torch.RotaryEmbedding(cfg, head_major=True)
    assert torch.autograd.gradcheck(lambda a, b: rotary(a, b, pos), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: rotary(a, b, pos), (q, k), fast_mode=True)
    # The double path rotates by the library's float32 cos/sin: within float32 cos/sin rounding
    # of the double-angle oracle.
    q_out, _ = rotary(q, k, pos)
    ref = ref_rotate(q.detach().transpose(1, 2), pos, 1e4, rd, layout).transpose(1, 2)
    bound = 2 * q.detach().abs().amax(-1, keepdim=True) * 2 * U
    assert torch.all((q_out.detach() - ref).abs() <= bound)


def test_autograd_float32_uses_kernels():
    x = torch.randn(len(POS), 4, 64, requires_grad=True)
    y = ropekit.torch.apply_rope(x, POS, CFG)
    with torch.no_grad():
        assert torch.equal(y, ropekit.apply_rope(x, POS, CFG))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, ropekit.apply_rope_backward(g, POS, CFG))
    assert_close_fp32(x.grad, ref_rotate(g, POS, 1e4, 64, "neox", inverse=True), g)
    # A broadcast (zero-stride) gradient, as produced by .sum(), is handled.
    x.grad = None
    ropekit.torch.apply_rope(x, POS, CFG).sum().backward()
    assert torch.equal(x.grad, ropekit.apply_rope_backward(torch.ones(len(POS), 4, 64), POS, CFG))


def test_hf_style_attention_one_liner():
    """q, k = rotary(q, k, position_ids) replacing apply_rotary_pos_emb in a LLaMA attention."""
    hf_config = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "rope_theta": 10000.0,
                 "max_position_embeddings": 4096}
    rotary = ropekit.torch.RotaryEmbedding(hf_config, head_major=True)
    b, t, d = 2, 6, 64
    q = torch.randn(b, 8, t, d, requires_grad=True)  # [B, H, T, D] after .transpose(1, 2)
    k = torch.randn(b, 2, t, d, requires_grad=True)
    position_ids = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])  # left padding

    q_rot, k_rot = rotary(q, k, position_ids)

    # transformers' formula, written out: cos/sin [B, T, D] unsqueezed over heads.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))
    freqs = position_ids.double()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rotate_half(x):
        return torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)

    q_ref = q.double() * cos + rotate_half(q.double()) * sin
    k_ref = k.double() * cos + rotate_half(k.double()) * sin
    assert torch.allclose(q_rot.double(), q_ref, rtol=0, atol=float(q.abs().max()) * 12 * U)
    assert torch.allclose(k_rot.double(), k_ref, rtol=0, atol=float(k.abs().max()) * 12 * U)
    (q_rot.square().sum() + k_rot.sum()).backward()
    # d/dq sum(R q)^2 = 2 R^T R q = 2 q (a rotation preserves norms), up to float32 rounding.
    assert torch.allclose(q.grad, 2 * q.detach(), rtol=0, atol=float(q.abs().max()) * 64 * U)
    assert torch.allclose(k.grad.double(),
                          ref_rotate(torch.ones(b, t, 2, d), position_ids, 1e4, d, "neox",
                                     inverse=True).transpose(1, 2),
                          rtol=0, atol=32 * U)


def test_module_errors():
    with pytest.raises(ValueError, match="numerics"):
        ropekit.torch.RotaryEmbedding(CFG, numerics="fast")
    rotary = ropekit.torch.RotaryEmbedding(CFG)
    with pytest.raises(TypeError, match="q"):
        rotary(np.zeros((2, 1, 64), np.float32), torch.zeros(2, 1, 64), [0, 1])
    with pytest.raises(ValueError, match="meta"):
        rotary(torch.zeros(2, 1, 64, device="meta"), torch.zeros(2, 1, 64, device="meta"), [0, 1])
    with pytest.raises(TypeError, match="dtype"):
        rotary(torch.zeros(2, 1, 64), torch.zeros(2, 1, 64, dtype=torch.float16), [0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlapping_outputs_rejected(dtype):
    x = torch.randn(4, 2, 64, dtype=dtype)
    with pytest.raises(ValueError, match="overlap"):
        ropekit.apply_rope_qk(x, x, [0, 1, 2, 3], CFG, inplace=True)
    buf = torch.randn(5, 2, 64, dtype=dtype)
    with pytest.raises(ValueError, match="overlap"):
        ropekit.apply_rope(buf[:4], [0, 1, 2, 3], CFG, out=buf[1:])


def test_inplace_bumps_autograd_version():
    # x is saved by autograd for w's gradient; rotating it in place must make backward fail
    # loudly, exactly as a torch in-place op would, instead of using the modified values.
    x = torch.randn(len(POS), 2, 64)
    w = torch.randn(len(POS), 2, 64, requires_grad=True)
    loss = (w * x).sum()
    version = x._version
    ropekit.apply_rope(x, POS, CFG, inplace=True)
    assert x._version > version
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
