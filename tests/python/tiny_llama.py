"""Shared setup of the command-line model tests: the built `ropekit` binary, a tiny corpus, a
tiny trained base checkpoint, `ropekit eval --dump-*` of a fixed token batch, a small
safetensors reader, an independent float64 PyTorch LLaMA (`LlamaTorch`, written from the papers:
RMSNorm, SwiGLU, GQA attention and each position encoding from its own formula) and the
tolerance check every comparison uses.

The float64 model is the oracle of test_model_torch.py (full fine-tuning), test_peft_cli.py
(LoRA) and test_prompt_tuning_cli.py (prompt and prefix tuning); each of those states its
tolerances.
"""

import json
import math
import os
import struct
import subprocess

import numpy as np
import torch

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")

torch.set_default_dtype(torch.float64)

# The batch and length every tiny training run uses.
SHAPE = ["--batch-size", "2", "--seq-len", "12", "--quiet"]
# A tiny base: 2 layers, d = 32, GQA 4/2 heads, F = 40, trained a few steps so that the norms and
# weights are away from their initial values.
BASE = ["--steps", "4", "--hidden-size", "32", "--layers", "2", "--heads", "4",
        "--intermediate-size", "40", "--lr", "0.02", "--warmup", "1", "--init-std", "0.1"]


def run(*args):
    """Runs `ropekit ARGS`; raises on a non-zero exit."""
    return subprocess.run([CLI, *args], check=True, capture_output=True, text=True)


def fails(*args):
    """Runs `ropekit ARGS`, which must fail; returns its stderr."""
    r = subprocess.run([CLI, *args], capture_output=True, text=True)
    assert r.returncode != 0, args
    return r.stderr


def read_file(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def corpus_file(tmp):
    words = ["alpha ", "beta ", "gamma ", "delta. ", "rope ", "yarn ", "\n"]
    rng = np.random.default_rng(0)
    text = "".join(words[i] for i in rng.integers(0, len(words), 4000))
    path = os.path.join(tmp, "corpus.txt")
    with open(path, "w") as f:
        f.write(text)
    return path


def train_base(tmp, corpus, name="base", extra=()):
    """Trains the tiny base checkpoint (2 kv heads unless `extra` names --kv-heads) into
    tmp/name; returns its directory."""
    out = os.path.join(tmp, name)
    kv = [] if "--kv-heads" in extra else ["--kv-heads", "2"]
    run("train", "--corpus", corpus, "--out", out, *BASE, *kv, *extra, *SHAPE)
    return out


def checkpoint_files(ckpt):
    """The bytes of a checkpoint's files (to show that an adapter run leaves its base alone)."""
    return {f: read_file(os.path.join(ckpt, f)) for f in ("config.json", "model.safetensors")}


def eval_dump(tmp, model, *args, grads=True):
    """`ropekit eval --model MODEL ARGS` on a fixed [3, 13] token batch. Returns the tokens
    (int64 tensor), the logits (float64 tensor), the parameter gradients (dict; None without
    `grads`) and eval's stdout."""
    tokens = np.random.default_rng(1).integers(0, 256, size=(3, 13)).astype(np.int32)
    tok_path = os.path.join(tmp, "tokens.npy")
    np.save(tok_path, tokens)
    logits_path = os.path.join(tmp, "logits.npy")
    grads_path = os.path.join(tmp, "grads.safetensors")
    dump = ["--dump-tokens", tok_path, "--dump-logits", logits_path]
    out = run("eval", "--model", model, *args, *dump, *(["--dump-grads", grads_path] * grads))
    logits = torch.from_numpy(np.load(logits_path).astype(np.float64))
    g = read_safetensors(grads_path) if grads else None
    return torch.from_numpy(tokens.astype(np.int64)), logits, g, out.stdout


def next_token_loss(logits, ids):
    """Mean cross-entropy of logits [B, T, V] against the next tokens ids[:, 1:]."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))


def assert_within(got, want, rel, what, nonzero=False):
    """max |got - want| <= rel * max |want|; with `nonzero`, max |want| must be > 0 as well."""
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert scale > 0 or not nonzero, f"{what}: the reference is zero"
    assert err <= rel * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def safetensors_header(path):
    raw = read_file(path)
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        assert e["dtype"] == "F32"
        b, en = e["data_offsets"]
        out[name] = torch.from_numpy(
            np.frombuffer(data[base + b:base + en], dtype="<f4").astype(np.float64).reshape(
                e["shape"]).copy())
    return out


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope_rotate(x, positions, inv_freq, layout):
    """x: [T, H, D]; rotates the first R = 2 * len(inv_freq) channels (RoFormer eq. 34)."""
    n = inv_freq.shape[0]
    ang = positions[:, None].double() * inv_freq[None, :]  # [T, N]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    if layout == "neox":
        a, b = x[..., :n], x[..., n:2 * n]
    else:
        a, b = x[..., 0:2 * n:2], x[..., 1:2 * n:2]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if layout == "neox":
        rot = torch.cat([ra, rb], dim=-1)
    else:
        rot = torch.stack([ra, rb], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., 2 * n:]], dim=-1)


def alibi_slopes(h):
    """Press et al. 2022, reference get_slopes."""

    def pow2(n):
        start = 2.0**(-(2.0**-(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(h).is_integer():
        return pow2(h)
    p = 2**math.floor(math.log2(h))
    return pow2(p) + pow2(2 * p)[0::2][:h - p]


def t5_bucket(rel, num_buckets, max_distance):
    """Raffel et al. 2020, causal _relative_position_bucket (rel = key - query)."""
    n = max(0, -rel)
    max_exact = num_buckets // 2
    if n < max_exact:
        return n
    v = max_exact + int(
        np.float32(math.log(np.float32(n) / np.float32(max_exact)) /
                   math.log(max_distance / max_exact) * (num_buckets - max_exact)))
    return min(v, num_buckets - 1)


class LlamaTorch:

    def __init__(self, cfg, tensors):
        self.cfg = cfg
        self.t = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        self.rk = cfg.get("ropekit", {})
        self.pe = self.rk.get("position_encoding", "rope")

    def forward(self, ids):
        c, t = self.cfg, self.t
        B, T = ids.shape
        d, H, Hkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        D = c["head_dim"]
        eps = c["rms_norm_eps"]
        pos = torch.arange(T)
        x = t["model.embed_tokens.weight"][ids]  # [B, T, d]
        scale = math.sqrt(d) if self.rk.get("embedding_scale") == "sqrt_dim" else 1.0
        if self.pe == "sinusoidal":
            n = self.rk["sinusoidal_base"]
            P = torch.zeros(T, d)
            for i in range(d // 2):
                w = pos.double() / n**(2 * i / d)
                P[:, 2 * i], P[:, 2 * i + 1] = torch.sin(w), torch.cos(w)
            x = scale * x + P
        elif self.pe == "learned":
            x = scale * x + t["model.embed_positions.weight"][pos]
        bias = torch.zeros(H, T, T)
        if self.pe == "alibi":
            m = torch.tensor(alibi_slopes(H))
            bias = -m[:, None, None] * (pos[:, None] - pos[None, :]).double()
        elif self.pe == "t5":
            buckets = torch.tensor([[t5_bucket(j - i, self.rk["num_buckets"],
                                               self.rk["max_distance"]) for j in range(T)]
                                    for i in range(T)])
            bias = t["model.relative_attention_bias.weight"][buckets].permute(2, 0, 1)
        if self.pe == "rope":
            R = self.rk.get("rotary_dim", D)
            inv_freq = c["rope_theta"]**(-torch.arange(0, R, 2).double() / R)
            sc = c.get("rope_scaling")
            if sc and sc["rope_type"] == "linear":
                inv_freq = inv_freq / sc["factor"]
            layout = self.rk.get("rope_layout", "neox")
        mask = pos[None, :] > pos[:, None]
        for l in range(c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
            q = (h @ t[p + "self_attn.q_proj.weight"].T).view(B, T, H, D)
            k = (h @ t[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D)
            v = (h @ t[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D)
            if self.pe == "rope":
                q = torch.stack([rope_rotate(q[b], pos, inv_freq, layout) for b in range(B)])
                k = torch.stack([rope_rotate(k[b], pos, inv_freq, layout) for b in range(B)])
            k = k.repeat_interleave(H // Hkv, dim=2)
            v = v.repeat_interleave(H // Hkv, dim=2)
            s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D) + bias[None]
            s = s.masked_fill(mask[None, None], float("-inf"))
            a = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, dim=-1), v).reshape(B, T, H * D)
            x = x + a @ t[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
            g = h @ t[p + "mlp.gate_proj.weight"].T
            u = h @ t[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ t[p + "mlp.down_proj.weight"].T
        x = rms_norm(x, t["model.norm.weight"], eps)
        head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
        return x @ head.T
