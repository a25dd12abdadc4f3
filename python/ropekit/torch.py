"""PyTorch integration: an autograd-aware rotary embedding backed by ropekit's kernels.

``RotaryEmbedding(config, head_major=False, numerics="exact", ...)`` is a ``torch.nn.Module``
whose ``forward(q, k, positions)`` returns ``(q_rotated, k_rotated)``. Its autograd function runs
ropekit's forward kernel and, for the backward pass, the same kernel with
``Direction::kBackward`` (rotation by -theta, the transpose). CPU tensors only; float32, bfloat16,
float16 use the SIMD kernels, float64 (e.g. ``torch.autograd.gradcheck``) is rotated in double with
the same cos/sin values.

Hugging Face LLaMA-style attention (q, k of shape [B, H, T, D], ``position_ids`` [B, T])::

    self.rotary = ropekit.torch.RotaryEmbedding(config, head_major=True)   # in __init__
    # replaces: query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    query_states, key_states = self.rotary(query_states, key_states, position_ids)

Differences from transformers' eager code: cos/sin are not rounded to bf16/fp16 before use and
the rotation rounds once (float32 arithmetic) instead of three times, so bf16/fp16 results are
within half an ulp of the float32 result rather than bit-equal to the eager formula. For the
length-dependent types (dynamic, longrope) the frequencies follow ``max(positions) + 1`` of each
call unless ``seq_len`` is given; cached keys are never re-rotated (as in transformers).
"""

import torch

from . import _ropekit
from ._ropekit import RopeConfig

__all__ = ["RotaryEmbedding", "apply_rope", "apply_rope_qk", "as_config"]


def as_config(config, layer_type=None):
    """A RopeConfig from a RopeConfig, a Hugging Face config dict / path / PretrainedConfig."""
    if isinstance(config, RopeConfig):
        if layer_type is not None:
            raise ValueError("layer_type applies only to Hugging Face configs, not RopeConfig")
        return config
    return RopeConfig.from_hf_config(config, layer_type)


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


class _RopeFunction(torch.autograd.Function):
    """y_j = R(p) x_j for each tensor x_j; dL/dx_j = R(p)^T dL/dy_j (same kernel, backward)."""

    @staticmethod
    def forward(ctx, options, positions, *xs):
        ctx.options = options
        ctx.positions = positions
        outs = _rotate(xs, positions, options, backward=False)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[2:]
        result = [None, None]
        todo = [g for g, n in zip(grads, needs) if n and g is not None]
        rotated = iter(_rotate(todo, ctx.positions, ctx.options, backward=True)) if todo else None
        for g, n in zip(grads, needs):
            result.append(next(rotated) if (n and g is not None) else None)
        return tuple(result)


def _rotate(xs, positions, options, backward):
    kwargs = dict(options, backward=backward)
    config = kwargs.pop("config")
    xs = [x.detach() for x in xs]
    if len(xs) == 2:
        return _ropekit.apply_rope_qk(xs[0], xs[1], positions, config, **kwargs)
    return tuple(_ropekit.apply_rope(x, positions, config, **kwargs) for x in xs)


def _options(config, layout, numerics, seq_len, head_major, num_threads):
    return dict(config=config, layout=layout, numerics=numerics, seq_len=seq_len,
                head_major=head_major, num_threads=num_threads)


def apply_rope(x, positions, config, *, layout=None, numerics="exact", seq_len=None,
               head_major=False, num_threads=None):
    """Autograd-aware ropekit.apply_rope for torch tensors (out of place)."""
    _check_tensor(x, "x")
    opts = _options(as_config(config), layout, numerics, seq_len, head_major, num_threads)
    return _RopeFunction.apply(opts, positions, x)[0]


def apply_rope_qk(q, k, positions, config, *, layout=None, numerics="exact", seq_len=None,
                  head_major=False, num_threads=None):
    """Autograd-aware ropekit.apply_rope_qk: returns (q_rotated, k_rotated)."""
    _check_tensor(q, "q")
    _check_tensor(k, "k")
    opts = _options(as_config(config), layout, numerics, seq_len, head_major, num_threads)
    return _RopeFunction.apply(opts, positions, q, k)


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding of q and k, backed by ropekit's kernels.

    Args:
      config: a RopeConfig, or a Hugging Face config (dict, path, PretrainedConfig).
      layout: "neox" / "gptj"; None takes the config's layout.
      numerics: "exact" (default) or "hf" (transformers' float32 order of operations).
      head_major: False for [T, H, D] / [B, T, H, D] tensors, True for [H, T, D] / [B, H, T, D]
        (Hugging Face attention after ``.transpose(1, 2)``).
      seq_len: fixed current length for dynamic / longrope (None: max(positions) + 1 per call).
      num_threads: None: ropekit.get_num_threads().
      layer_type: per-layer-type entry of a Hugging Face rope_parameters dict.
    """

    def __init__(self, config, *, layout=None, numerics="exact", head_major=False, seq_len=None,
                 num_threads=None, layer_type=None):
        super().__init__()
        self.config = as_config(config, layer_type)
        self.layout = layout if layout is not None else self.config.layout
        self.numerics = numerics
        self.head_major = head_major
        self.seq_len = seq_len
        self.num_threads = num_threads
        # Validate the options now rather than at the first forward.
        self.config.inv_freq(numerics=numerics)
        if self.layout not in ("neox", "gptj", "half", "halfsplit", "interleaved"):
            raise ValueError(f"layout must be 'neox' or 'gptj', got {self.layout!r}")

    def forward(self, q, k, positions):
        """Returns (q_rotated, k_rotated); q and k may have different head counts."""
        _check_tensor(q, "q")
        _check_tensor(k, "k")
        opts = _options(self.config, self.layout, self.numerics, self.seq_len, self.head_major,
                        self.num_threads)
        return _RopeFunction.apply(opts, positions, q, k)

    def extra_repr(self):
        return (f"{self.config!r}, layout={self.layout!r}, numerics={self.numerics!r}, "
                f"head_major={self.head_major}")
