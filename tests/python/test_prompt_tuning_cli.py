"""Prompt tuning (`ropekit train --prompt-tuning K`) and prefix tuning (`--prefix-tuning K`)
against the PEFT format and independent float64 implementations of Hugging Face semantics
written here.

A tiny base is trained with `ropekit train`, then a prompt-tuning adapter (TEXT init) for a few
steps. The test reads adapter_config.json and adapter_model.safetensors as PEFT would
(`prompt_embeddings` [num_virtual_tokens, token_dim], F32, metadata format "pt"), and computes
what PEFT's PeftModelForCausalLM.forward does with them: the virtual embeddings concatenated in
front of inputs_embeds, LlamaModel deriving position_ids 0..K+T-1 from the input length (so the
virtual tokens are RoPE-rotated at positions 0..K-1 and the real tokens start at K), labels -100
on the virtual rows. Logits and the gradient of `prompt_embeddings` are compared with `ropekit
eval --adapter --dump-logits --dump-grads`; greedy `generate --adapter` (KV cache) with a float64
recompute of the whole sequence at every step.

Prefix tuning: the saved `prompt_embeddings` [K, L * 2 * Hkv * D] is viewed as PEFT's get_prompt
does ([K, L * 2, Hkv, D], layer l's key at slice 2l, value at 2l + 1) and handed to an
independent LLaMA as past_key_values: cache entries 0..K-1, never rotated, real tokens at
positions K..K+T-1 seeing every prefix entry. With --prefix-projection the table must be the
output of PEFT's PrefixEncoder MLP recomputed here from the saved encoder, and the MLP's
gradients are compared as well.

Tolerances as in test_model_torch.py: ropekit computes in float32 (u = 2^-24) with sums of at
most 64 terms per dot product over ~20 forward / ~40 backward ops through 2 layers, so 2e-4 of
the largest logit and 1e-3 of the largest gradient are ~10x above the accumulated rounding and far
below any real error (a virtual token at the wrong position or a missing row shifts values by
O(1) of their scale). A generated token is compared where the float64 top-2 margin exceeds twice
the logit tolerance (elsewhere float32 may legitimately pick the other token).
"""

import json
import math
import os
import struct
import subprocess
import tempfile

import numpy as np
import torch

from test_model_torch import CLI, corpus_file, read_safetensors

torch.set_default_dtype(torch.float64)
K, TEXT = 5, "rope "


def run(*args):
    return subprocess.run([CLI, *args], check=True, capture_output=True, text=True)


def fails(*args):
    r = subprocess.run([CLI, *args], capture_output=True, text=True)
    assert r.returncode != 0, args
    return r.stderr


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rotate_half_split(x, pos, theta):
    """x [B, T, H, D], positions pos [T]: HF's apply_rotary_pos_emb (rotate_half layout)."""
    D = x.shape[-1]
    inv = theta**(-torch.arange(0, D, 2).double() / D)
    ang = pos[:, None].double() * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + rot * sin


def hf_llama_from_embeds(cfg, t, x):
    """LlamaModel.forward on inputs_embeds x [B, N, d], position_ids = arange(N); the logits."""
    B, N, _ = x.shape
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    pos = torch.arange(N)
    mask = pos[None, :] > pos[:, None]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        q = rotate_half_split((h @ t[p + "self_attn.q_proj.weight"].T).view(B, N, H, D), pos, theta)
        k = rotate_half_split((h @ t[p + "self_attn.k_proj.weight"].T).view(B, N, Hkv, D), pos,
                              theta)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(B, N, Hkv, D)
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        x = x + torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, N, H * D) @ t[
            p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + (torch.nn.functional.silu(h @ t[p + "mlp.gate_proj.weight"].T) *
                 (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    return rms_norm(x, t["model.norm.weight"], eps) @ t["model.embed_tokens.weight"].T


def peft_prompt_logits(cfg, t, prompt, ids):
    """PeftModelForCausalLM.forward for PROMPT_TUNING: cat(prompt, embed(ids)); real rows."""
    B = ids.shape[0]
    x = torch.cat([prompt[None].expand(B, -1, -1), t["model.embed_tokens.weight"][ids]], 1)
    return hf_llama_from_embeds(cfg, t, x)[:, prompt.shape[0]:]


def test_prompt_tuning_files_logits_gradients_generate_resume_and_errors():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base, adapter, part = (os.path.join(tmp, n) for n in ("base", "adapter", "part"))
        shape = ["--batch-size", "2", "--seq-len", "12", "--quiet"]
        run("train", "--corpus", corpus, "--out", base, "--steps", "4", "--hidden-size", "32",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate-size", "40",
            "--lr", "0.02", "--warmup", "1", "--init-std", "0.1", *shape)
        base_files = {f: open(os.path.join(base, f), "rb").read()
                      for f in ("config.json", "model.safetensors")}
        pt = ["--corpus", corpus, "--init", base, "--steps", "4", "--checkpoint-interval", "2",
              "--lr", "0.05", "--warmup", "1", "--prompt-tuning", str(K),
              "--prompt-tuning-init-text", TEXT, *shape]
        run("train", "--out", adapter, *pt)
        for f, data in base_files.items():
            assert open(os.path.join(base, f), "rb").read() == data, f
        # Resume is bit-exact: adapter, moments and config.
        run("train", "--out", part, "--stop-after", "2", *pt)
        run("train", "--out", part, "--resume", "--corpus", corpus, "--quiet")
        for f in ("adapter_model.safetensors", "optimizer.safetensors", "adapter_config.json"):
            assert open(os.path.join(adapter, f), "rb").read() == open(os.path.join(part, f),
                                                                       "rb").read(), f

        # adapter_config.json: PEFT's PromptTuningConfig keys, sorted.
        text = open(os.path.join(adapter, "adapter_config.json")).read()
        cfg = json.loads(text)
        assert list(cfg) == sorted(cfg)
        with open(os.path.join(base, "config.json")) as f:
            mcfg = json.load(f)
        d = mcfg["hidden_size"]
        assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["num_virtual_tokens"] == K and cfg["token_dim"] == d
        assert cfg["num_transformer_submodules"] == 1 and cfg["num_layers"] == 2
        assert cfg["num_attention_heads"] == mcfg["num_attention_heads"]
        assert cfg["prompt_tuning_init"] == "TEXT" and cfg["prompt_tuning_init_text"] == TEXT
        assert os.path.samefile(cfg["base_model_name_or_path"], base)

        # adapter_model.safetensors: one F32 tensor [K, d], metadata format pt.
        raw = open(os.path.join(adapter, "adapter_model.safetensors"), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        assert header["__metadata__"]["format"] == "pt"
        assert {k: (v["dtype"], v["shape"]) for k, v in header.items()
                if k != "__metadata__"} == {"prompt_embeddings": ("F32", [K, d])}
        prompt = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))[
            "prompt_embeddings"]
        base_t = read_safetensors(os.path.join(base, "model.safetensors"))
        # Trained away from the TEXT init (the embedding rows of "rope ").
        init = base_t["model.embed_tokens.weight"][torch.tensor([ord(c) for c in TEXT])]
        assert (prompt - init).abs().max() > 0

        # Logits and the gradient of prompt_embeddings against the float64 PEFT computation.
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 256, size=(3, 13)).astype(np.int32)
        tok_path = os.path.join(tmp, "tokens.npy")
        np.save(tok_path, tokens)
        logits_path = os.path.join(tmp, "logits.npy")
        grads_path = os.path.join(tmp, "grads.safetensors")
        run("eval", "--model", base, "--adapter", adapter, "--dump-tokens", tok_path,
            "--dump-logits", logits_path, "--dump-grads", grads_path)
        p = prompt.clone().requires_grad_(True)
        ids = torch.from_numpy(tokens.astype(np.int64))
        logits = peft_prompt_logits(mcfg, base_t, p, ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        got = torch.from_numpy(np.load(logits_path).astype(np.float64))
        scale = logits.abs().max().item()
        err = (got - logits.detach()).abs().max().item()
        assert err <= 2e-4 * scale, f"logits: max error {err:.3g}, scale {scale:.3g}"
        g = read_safetensors(grads_path)
        assert set(g) == {"prompt_embeddings"}
        g_scale = p.grad.abs().max().item()
        g_err = (g["prompt_embeddings"] - p.grad).abs().max().item()
        assert g_scale > 0 and g_err <= 1e-3 * g_scale, f"grad: {g_err:.3g} of {g_scale:.3g}"

        # generate --adapter (KV cache, virtual tokens at entries 0..K-1) against a recompute.
        out = subprocess.run([CLI, "generate", "--model", base, "--adapter", adapter, "--prompt",
                              "alpha ", "--max-new-tokens", "8"], check=True,
                             capture_output=True).stdout
        new = list(out[len(b"alpha "):-1])
        assert len(new) == 8
        seq = [ord(c) for c in "alpha "]
        compared = 0
        with torch.no_grad():
            for tok in new:
                last = peft_prompt_logits(mcfg, base_t, prompt, torch.tensor([seq]))[0, -1]
                top2 = torch.topk(last, 2).values
                if (top2[0] - top2[1]).item() > 4e-4 * scale:
                    assert tok == int(last.argmax()), (seq, tok)
                    compared += 1
                seq.append(tok)
        assert compared >= 4

        # Errors name the option and the range.
        merged = os.path.join(tmp, "merged")
        assert "cannot be merged" in fails("merge", "--model", base, "--adapter", adapter,
                                           "--out", merged)
        assert not os.path.exists(os.path.join(merged, "config.json"))
        e = os.path.join(tmp, "e")
        common = ["train", "--corpus", corpus, "--init", base, "--out", e, "--steps", "1", *shape]
        assert "--prompt-tuning 0 (num_virtual_tokens) is outside [1, " in fails(
            *common, "--prompt-tuning", "0")
        assert "cannot be combined" in fails(*common, "--prompt-tuning", "2", "--lora-rank", "2")
        assert "needs --prompt-tuning" in fails(*common, "--prompt-tuning-init-text", "x")
        assert "--qlora" in fails("eval", "--model", base, "--adapter", adapter, "--qlora",
                                  "--text", corpus, "--context", "12")


def hf_llama_with_prefix(cfg, t, ids, table):
    """PEFT PREFIX_TUNING on LLaMA: get_prompt's table [K, L*2*td] viewed [K, L*2, Hkv, D], layer
    l's key = slice 2l, value = 2l+1, handed over as past_key_values (cache entries 0..K-1,
    never rotated); cache_position and position_ids K..K+T-1 for the real tokens, which see
    every prefix entry."""
    B, T = ids.shape
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta, L = cfg["rms_norm_eps"], cfg["rope_theta"], cfg["num_hidden_layers"]
    K = table.shape[0]
    kv = table.view(K, L * 2, Hkv, D)
    pos = torch.arange(K, K + T)
    kpos = torch.arange(K + T)
    mask = kpos[None, :] > pos[:, None]
    x = t["model.embed_tokens.weight"][ids]
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        q = rotate_half_split((h @ t[p + "self_attn.q_proj.weight"].T).view(B, T, H, D), pos, theta)
        k = rotate_half_split((h @ t[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D), pos,
                              theta)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D)
        k = torch.cat([kv[:, 2 * l][None].expand(B, -1, -1, -1), k], 1)
        v = torch.cat([kv[:, 2 * l + 1][None].expand(B, -1, -1, -1), v], 1)
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        x = x + torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, T, H * D) @ t[
            p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + (torch.nn.functional.silu(h @ t[p + "mlp.gate_proj.weight"].T) *
                 (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    return rms_norm(x, t["model.norm.weight"], eps) @ t["model.embed_tokens.weight"].T


def prefix_encoder(enc):
    """PEFT's PrefixEncoder with prefix_projection: Embedding -> Linear -> Tanh -> Linear."""
    z = enc["prompt_encoder.embedding.weight"] @ enc["prompt_encoder.transform.0.weight"].T
    h = torch.tanh(z + enc["prompt_encoder.transform.0.bias"])
    return h @ enc["prompt_encoder.transform.2.weight"].T + enc["prompt_encoder.transform.2.bias"]


def test_prefix_tuning_files_logits_gradients_generate_resume_and_errors():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base = os.path.join(tmp, "base")
        plain, proj, part = (os.path.join(tmp, n) for n in ("plain", "proj", "part"))
        shape = ["--batch-size", "2", "--seq-len", "12", "--quiet"]
        run("train", "--corpus", corpus, "--out", base, "--steps", "4", "--hidden-size", "32",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate-size", "40",
            "--lr", "0.02", "--warmup", "1", "--init-std", "0.1", *shape)
        base_files = {f: open(os.path.join(base, f), "rb").read()
                      for f in ("config.json", "model.safetensors")}
        common = ["--corpus", corpus, "--init", base, "--steps", "4", "--lr", "0.02",
                  "--warmup", "1", "--prefix-tuning", "4", *shape]
        run("train", "--out", plain, *common)
        pj = [*common, "--prefix-projection", "--prefix-hidden", "24", "--checkpoint-interval",
              "2"]
        run("train", "--out", proj, *pj)
        for f, data in base_files.items():
            assert open(os.path.join(base, f), "rb").read() == data, f
        run("train", "--out", part, "--stop-after", "2", *pj)
        run("train", "--out", part, "--resume", "--corpus", corpus, "--quiet")
        for f in ("adapter_model.safetensors", "optimizer.safetensors", "adapter_config.json",
                  "prefix_encoder.safetensors"):
            assert open(os.path.join(proj, f), "rb").read() == open(os.path.join(part, f),
                                                                    "rb").read(), f
        with open(os.path.join(base, "config.json")) as f:
            mcfg = json.load(f)
        Hkv, D, L = mcfg["num_key_value_heads"], mcfg["head_dim"], mcfg["num_hidden_layers"]
        td = Hkv * D  # PEFT's GQA rule
        base_t = read_safetensors(os.path.join(base, "model.safetensors"))
        for adapter, projected in ((plain, False), (proj, True)):
            cfg = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())
            assert list(cfg) == sorted(cfg)
            assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["task_type"] == "CAUSAL_LM"
            assert cfg["num_virtual_tokens"] == 4 and cfg["token_dim"] == td
            assert cfg["num_attention_heads"] == Hkv and cfg["num_layers"] == L
            assert cfg["num_transformer_submodules"] == 1
            assert cfg["prefix_projection"] == projected
            assert cfg["encoder_hidden_size"] == (24 if projected else td)
            raw = open(os.path.join(adapter, "adapter_model.safetensors"), "rb").read()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            assert header["__metadata__"]["format"] == "pt"
            assert {k: (v["dtype"], v["shape"]) for k, v in header.items()
                    if k != "__metadata__"} == {"prompt_embeddings": ("F32", [4, L * 2 * td])}
            table = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))[
                "prompt_embeddings"]
            enc = None
            if projected:
                # What PEFT saves is the encoder's output: recomputed here from the encoder
                # (float32 rounding of sums of 24 terms, relative ~1e-6).
                enc = {k: v.clone().requires_grad_(True) for k, v in read_safetensors(
                    os.path.join(adapter, "prefix_encoder.safetensors")).items()}
                out = prefix_encoder(enc)
                assert (out - table).abs().max() <= 1e-5 * table.abs().max()
            rng = np.random.default_rng(1)
            tokens = rng.integers(0, 256, size=(3, 13)).astype(np.int32)
            tok_path = os.path.join(tmp, "tokens.npy")
            np.save(tok_path, tokens)
            logits_path = os.path.join(tmp, "logits.npy")
            grads_path = os.path.join(tmp, "grads.safetensors")
            # eval of the training directory (projection: the encoder, as --resume loads it).
            run("eval", "--model", base, "--adapter", adapter, "--dump-tokens", tok_path,
                "--dump-logits", logits_path, "--dump-grads", grads_path)
            p = table.clone().requires_grad_(True)
            ids = torch.from_numpy(tokens.astype(np.int64))
            logits = hf_llama_with_prefix(mcfg, base_t, ids[:, :-1],
                                          prefix_encoder(enc) if projected else p)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
            got = torch.from_numpy(np.load(logits_path).astype(np.float64))
            scale = logits.abs().max().item()
            err = (got - logits.detach()).abs().max().item()
            assert err <= 2e-4 * scale, f"logits: max error {err:.3g}, scale {scale:.3g}"
            g = read_safetensors(grads_path)
            leaves = enc if projected else {"prompt_embeddings": p}
            assert set(g) == set(leaves)
            for k, leaf in leaves.items():
                g_scale = leaf.grad.abs().max().item()
                g_err = (g[k] - leaf.grad).abs().max().item()
                assert g_scale > 0 and g_err <= 1e-3 * g_scale, f"{k}: {g_err:.3g} of {g_scale:.3g}"
            # generate --adapter: the prefix in the KV cache, greedy against a recompute.
            out = subprocess.run([CLI, "generate", "--model", base, "--adapter", adapter,
                                  "--prompt", "alpha ", "--max-new-tokens", "8"], check=True,
                                 capture_output=True).stdout
            new = list(out[len(b"alpha "):-1])
            assert len(new) == 8
            seq = [ord(c) for c in "alpha "]
            compared = 0
            with torch.no_grad():
                for tok in new:
                    last = hf_llama_with_prefix(mcfg, base_t, torch.tensor([seq]), table)[0, -1]
                    top2 = torch.topk(last, 2).values
                    if (top2[0] - top2[1]).item() > 4e-4 * scale:
                        assert tok == int(last.argmax()), (seq, tok)
                        compared += 1
                    seq.append(tok)
            assert compared >= 4
        assert "cannot be merged" in fails("merge", "--model", base, "--adapter", plain, "--out",
                                           os.path.join(tmp, "m"))
        e = ["train", "--corpus", corpus, "--init", base, "--out", os.path.join(tmp, "e"),
             "--steps", "1", *shape]
        assert "cannot be combined" in fails(*e, "--prefix-tuning", "2", "--prompt-tuning", "2")
        assert "needs --prefix-tuning" in fails(*e, "--prefix-projection")
        assert "needs --prefix-projection" in fails(*e, "--prefix-tuning", "2", "--prefix-hidden",
                                                    "8")
        assert "--prefix-tuning 12 (num_virtual_tokens) is outside [1, 11]" in fails(
            *e, "--prefix-tuning", "12")
