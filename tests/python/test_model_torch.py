"""The ropekit LLaMA model against an independent PyTorch LLaMA written here in float64.

A tiny checkpoint is trained for a few steps with `ropekit train` (so the norms and weights are
not at their initial values), read back with the small safetensors reader below, and run through
`LlamaTorch`, written from the papers (RMSNorm, SwiGLU, GQA attention, and each position
encoding from its own formula: RoPE in both channel layouts with partial rotation and linear
scaling, ALiBi slopes, T5 buckets, the sinusoid, a learned table, none). `ropekit eval
--dump-tokens/--dump-logits/--dump-grads` gives ropekit's logits and parameter gradients for the
same token batch; both must match the float64 model.

Tolerances: ropekit computes in float32 (unit roundoff u = 2^-24) with sums of at most
max(d, F, T) = 64 terms per dot product, through 2 layers. The forward error relative to the
largest value of a tensor is then a small multiple of 64 * u ~ 4e-6 per op, accumulating over
the ~20 ops of the forward and ~40 of the backward; 2e-4 (logits) and 1e-3 (gradients) of the
tensor's largest magnitude are ~10x above that bound and far below the size of any real error
(a wrong sign, a missing term or a wrong position shifts values by O(1) of their scale).
"""

import json
import math
import os
import struct
import subprocess
import tempfile

import numpy as np
import pytest
import torch

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")

torch.set_default_dtype(torch.float64)


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


CASES = {
    "rope": ["--pe", "rope"],
    "rope_gptj_partial_linear": [
        "--pe", "rope", "--rope-layout", "gptj", "--rotary-dim", "8", "--rope-scaling",
        '{"rope_type":"linear","factor":2.5}', "--untied"
    ],
    "mqa_rope_theta": ["--pe", "rope", "--kv-heads", "1", "--rope-theta", "500"],
    "none": ["--pe", "none"],
    "sinusoidal": ["--pe", "sinusoidal"],
    "learned": ["--pe", "learned", "--untied"],
    "alibi": ["--pe", "alibi"],
    "t5": ["--pe", "t5", "--t5-buckets", "8", "--t5-max-distance", "12"],
}


def corpus_file(tmp):
    words = ["alpha ", "beta ", "gamma ", "delta. ", "rope ", "yarn ", "\n"]
    rng = np.random.default_rng(0)
    text = "".join(words[i] for i in rng.integers(0, len(words), 4000))
    path = os.path.join(tmp, "corpus.txt")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_gradients_match_torch(name):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        subprocess.run([
            CLI, "train", "--corpus", corpus_file(tmp), "--out", ckpt, "--steps", "4",
            "--batch-size", "2", "--seq-len", "12", "--hidden-size", "32", "--layers", "2",
            "--heads", "4", "--intermediate-size", "40", "--lr", "0.02", "--warmup", "1",
            "--init-std", "0.1", "--quiet"
        ] + CASES[name] + ([] if "--kv-heads" in CASES[name] else ["--kv-heads", "2"]),
                       check=True, capture_output=True)
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 256, size=(3, 13)).astype(np.int32)
        tok_path = os.path.join(tmp, "tokens.npy")
        np.save(tok_path, tokens)
        logits_path = os.path.join(tmp, "logits.npy")
        grads_path = os.path.join(tmp, "grads.safetensors")
        out = subprocess.run([
            CLI, "eval", "--model", ckpt, "--dump-tokens", tok_path, "--dump-logits", logits_path,
            "--dump-grads", grads_path
        ], check=True, capture_output=True, text=True)
        loss_rk = float(out.stdout.split()[1])
        with open(os.path.join(ckpt, "config.json")) as f:
            cfg = json.load(f)
        model = LlamaTorch(cfg, read_safetensors(os.path.join(ckpt, "model.safetensors")))
        ids = torch.from_numpy(tokens.astype(np.int64))
        logits = model.forward(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        got = torch.from_numpy(np.load(logits_path).astype(np.float64))
        scale = logits.abs().max().item()
        err = (got - logits.detach()).abs().max().item()
        assert err <= 2e-4 * scale, f"logits: max error {err:.3g}, scale {scale:.3g}"
        assert abs(loss_rk - loss.item()) <= 2e-4 * loss.item()
        grads = read_safetensors(grads_path)
        assert set(grads) == set(model.t), (set(grads) ^ set(model.t))
        for k, tt in model.t.items():
            want = tt.grad
            g_scale = want.abs().max().item()
            g_err = (grads[k] - want).abs().max().item()
            assert g_err <= 1e-3 * g_scale + 1e-12, f"{k}: max error {g_err:.3g}, scale {g_scale:.3g}"


def test_t5_bucket_oracle_matches_published_values():
    # T5 (Raffel et al. 2020, arXiv:1910.10683): 32 buckets, max_distance 128.
    got = [t5_bucket(-n, 32, 128) for n in (16, 17, 32, 64, 100, 116, 500)]
    assert got == [16, 16, 21, 26, 30, 31, 31]


def test_cli_errors_name_the_problem():
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([CLI, "eval", "--model", tmp, "--text", CLI], capture_output=True,
                           text=True)
        assert r.returncode != 0 and "config.json" in r.stderr
        r = subprocess.run([CLI, "train", "--out", os.path.join(tmp, "x"), "--corpus", CLI,
                            "--pe", "bogus"], capture_output=True, text=True)
        assert r.returncode != 0 and "bogus" in r.stderr
        r = subprocess.run([CLI, "train", "--out", os.path.join(tmp, "x"), "--corpus", CLI,
                            "--heads", "4", "--kv-heads", "3", "--steps", "1"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "num_key_value_heads" in r.stderr
