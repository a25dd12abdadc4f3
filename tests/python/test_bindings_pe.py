"""Python bindings of the other position encodings (ALiBi, T5 buckets, sinusoidal) against
independent implementations written here from the papers' reference code."""

import math

import numpy as np
import pytest
import torch

from ropekit_import import import_ropekit


ropekit = import_ropekit()


def oracle_alibi_slopes(n):
    """Press et al. 2022, get_slopes of the reference implementation."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + oracle_alibi_slopes(2 * closest)[0::2][: n - closest]


def oracle_t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """transformers' T5Attention._relative_position_bucket (torch, float32 log)."""
    rp = torch.as_tensor(relative_position, dtype=torch.int64)
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret = (rp > 0).to(torch.long) * num_buckets
        n = torch.abs(rp)
    else:
        n = -torch.min(rp, torch.zeros_like(rp))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return (ret + torch.where(is_small, n, val_if_large)).numpy()


@pytest.mark.parametrize("heads", [1, 2, 6, 8, 12, 16, 24, 40])
def test_alibi_slopes_and_bias(heads):
    ref = np.array(oracle_alibi_slopes(heads))
    got = ropekit.alibi_slopes(heads)
    np.testing.assert_allclose(got, ref, rtol=4 * 2.0 ** -52, atol=0)
    q = np.array([0, 5, 4097, 131101])
    k = np.array([0, 3, 5, 4096, 131101])
    bias = ropekit.alibi_bias(heads, q, k)
    assert bias.shape == (heads, 4, 5) and bias.dtype == np.float32
    expected = -ref[:, None, None] * (q[None, :, None] - k[None, None, :]).astype(np.float64)
    # Computed in double, rounded once to float32.
    assert np.all(np.abs(bias - expected) <= np.abs(expected) * 2.0 ** -24)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 128), (32, 64)])
def test_t5_buckets(bidirectional, num_buckets, max_distance):
    rel = np.arange(-1500, 1500)
    got = ropekit.t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    assert got.shape == rel.shape
    np.testing.assert_array_equal(got, oracle_t5_bucket(rel, bidirectional, num_buckets,
                                                        max_distance))
    assert ropekit.t5_relative_bucket(-17) == int(oracle_t5_bucket([-17], False, 32, 128)[0])


@pytest.mark.parametrize("dim", [64, 7])
def test_sinusoidal(dim):
    pos = np.array([0, 1, 31, 4097, 131101, 1048573])
    got = ropekit.sinusoidal_table(pos, dim)
    assert got.shape == (len(pos), dim) and got.dtype == np.float32
    i = np.arange(dim // 2)
    angle = pos[:, None] / 10000.0 ** (2 * i / dim)
    ref = np.zeros((len(pos), dim))
    ref[:, 0: 2 * (dim // 2): 2] = np.sin(angle)
    ref[:, 1: 2 * (dim // 2): 2] = np.cos(angle)
    # One rounding to float32 of values in [-1, 1]; the double angle is good to ~1e-10 here.
    assert np.all(np.abs(got - ref) <= 2.0 ** -24 + 1e-9)


def test_pe_errors():
    with pytest.raises(ValueError, match="num_heads|heads"):
        ropekit.alibi_slopes(0)
    with pytest.raises(ValueError, match="query_positions"):
        ropekit.alibi_bias(4, [-1, 2], [0])
    with pytest.raises(TypeError, match="positions"):
        ropekit.sinusoidal_table([0.5, 1.0], 8)
    with pytest.raises(ValueError, match="dim"):
        ropekit.sinusoidal_table([0, 1], 0)
    with pytest.raises(ValueError, match="num_buckets|max_distance"):
        ropekit.t5_relative_bucket(5, num_buckets=0)
    with pytest.raises(TypeError, match="relative_position"):
        ropekit.t5_relative_bucket(np.array([0.5]))
