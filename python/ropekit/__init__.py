"""ropekit: rotary position embeddings (RoPE) with Hugging Face semantics, C++ SIMD kernels.

Configuration
-------------
``RopeConfig.from_hf_config(dict_or_path, layer_type=None)`` reads a Hugging Face ``config.json``
(a dict, a path, or a ``transformers.PretrainedConfig``); ``RopeConfig(head_dim=128,
rope_type="llama3", base=5e5, factor=8, ...)`` takes every field by keyword. A config is
immutable and caches its cos/sin tables per (numerics, sequence length), thread-safely: build it
once and reuse it.

* ``config.inv_freq(seq_len=None, numerics="exact")`` -> float64 array [N] (N = rotary_dim / 2)
* ``config.attention_factor`` / ``config.attention_factor_for(seq_len, numerics)`` -> A
* ``config.cos_sin(positions, numerics="exact", seq_len=None)`` -> float32 (cos, sin), [T, N],
  A applied: the values the kernels use.
* ``config.layout``: "neox" (half-split, Hugging Face ``rotate_half``) or "gptj" (interleaved).

Numerics: ``"exact"`` forms angles in double and rounds cos/sin once to float32; ``"hf"``
reproduces transformers' float32 order of operations (inverse frequencies, ``fl32(p) * w``,
float32 cos/sin, times ``fl32(A)``).

Rotation
--------
``apply_rope(x, positions, config, *, layout=None, numerics="exact", inplace=False,
backward=False, seq_len=None, num_threads=None, head_major=False, out=None)``

* ``x``: a NumPy array (float32, float16, float64) or a CPU torch tensor (float32, bfloat16,
  float16, float64) of shape [T, H, D] or [B, T, H, D]; with ``head_major=True``, [H, T, D] or
  [B, H, T, D] (the flag says which axis is tokens; the memory order is free). Any strides are
  used as they are (zero-copy: slices of a fused QKV tensor, transposed views) as long as the last
  dimension is contiguous. Otherwise an out-of-place call rotates a contiguous copy, while an
  in-place call raises ValueError.
* ``positions``: int32/int64 (numpy, torch or a list), shape [T] (shared by the batch) or [B, T],
  each in [0, 2^31 - 1]. Any order, no implicit arange.
* Channels [0, rotary_dim) are rotated, [rotary_dim, D) pass through. ``layout=None`` takes
  ``config.layout``.
* ``inplace=True`` writes into ``x`` and returns it; otherwise a new contiguous array of the same
  type is returned (or ``out``, when given).
* ``backward=True`` (or ``apply_rope_backward(grad, ...)``) applies the transpose R(p)^T, the
  gradient of the forward rotation.
* ``seq_len``: the current sequence length of the length-dependent types (dynamic NTK, longrope).
  None: ``max(positions) + 1``, what transformers uses for each forward call. Pin it to keep
  the frequencies fixed across decoding steps.
* ``num_threads``: None takes ``get_num_threads()`` (``set_num_threads(n)``; default: all
  hardware threads; small inputs run on the calling thread). Results are bitwise identical for
  any thread count. The GIL is released during the computation.
* float64 inputs are rotated in double with the same float32 cos/sin values (for gradcheck and
  as a high-precision path); the other dtypes run the SIMD kernels (float32 arithmetic, one
  rounding to the storage type).

``apply_rope_qk(q, k, positions, config, ...)`` rotates q ([.., H, D]) and k ([.., Hkv, D]) in one
call and returns ``(q_out, k_out)``.

Multimodal positions (M-RoPE, Qwen2-VL / Qwen3-VL): a config with ``mrope_section``
(``RopeConfig.from_hf_config`` reads Qwen2-VL's ``"rope_scaling": {"type": "mrope", ...}`` and
Qwen3-VL's ``mrope_interleaved``; or ``RopeConfig(..., mrope_section=[16, 24, 24],
mrope_interleaved=False)``) takes positions of shape [A, T] or [A, B, T], one row per axis.

KV caches
---------
``apply_rope_and_append(q, k, v, positions, cache_k, cache_v, slots, config, *, layout=None,
numerics="exact", num_threads=None)`` rotates q [T, H, D] in place and k [T, Hkv, D], and writes
the rotated k and v into ``cache_k`` / ``cache_v`` (C-contiguous [S, Hkv, D], or paged
[pages, page_size, Hkv, D]) at ``slots`` (one cache row per token; negative = padding) in one
pass. Returns q. ``shift_keys(cache_k, delta, config, *, slots=None, ...)`` re-rotates cached keys
in place by ``delta`` positions (context shift; every slot when ``slots`` is None).

Errors (wrong dtype, shape, device, non-finite config values, positions out of range) raise
TypeError or ValueError naming the argument. PyTorch autograd: see ``ropekit.torch``.

Other position encodings
------------------------
``alibi_slopes(H)`` (float64 [H]), ``alibi_bias(H, query_positions, key_positions)`` (float32
[H, Tq, Tk], -m_h * (i - j), no mask), ``t5_relative_bucket(key_pos - query_pos,
bidirectional=False, num_buckets=32, max_distance=128)`` (int or int32 array),
``sinusoidal_table(positions, dim, base=10000.0)`` (float32 [T, dim]).
"""

from ._ropekit import (
    MAX_POSITION,
    RopeConfig,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_and_append,
    apply_rope_backward,
    apply_rope_qk,
    get_num_threads,
    set_num_threads,
    shift_keys,
    simd_target,
    sinusoidal_table,
    t5_relative_bucket,
)

__all__ = [
    "MAX_POSITION",
    "RopeConfig",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "apply_rope_and_append",
    "apply_rope_backward",
    "apply_rope_qk",
    "get_num_threads",
    "set_num_threads",
    "shift_keys",
    "simd_target",
    "sinusoidal_table",
    "t5_relative_bucket",
]
__version__ = "0.1.0"
