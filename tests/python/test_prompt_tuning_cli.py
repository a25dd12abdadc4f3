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

import math
import os
import subprocess
import tempfile

import torch

from tiny_llama import (CLI, SHAPE, assert_within, checkpoint_files, corpus_file, eval_dump,
                        fails, next_token_loss, read_file, read_json, read_safetensors, rms_norm,
                        run, safetensors_header, train_base)

K, TEXT = 5, "rope "


def rotate_half_split(x, pos, theta):
    """x [B, T, H, D], positions pos [T]: HF's apply_rotary_pos_emb (rotate_half layout)."""
    D = x.shape[-1]
    inv = theta**(-torch.arange(0, D, 2).double() / D)
    ang = pos[:, None].double() * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * cos + rot * sin


def hf_llama(cfg, t, x, pos, prefix=None):
    """LlamaModel.forward on inputs_embeds x [B, T, d] at position_ids pos [T]; the logits.
    prefix: optional past_key_values [K, L * 2, Hkv, D] (layer l's key at 2l, value at 2l + 1),
    cache entries 0..K-1 that are never rotated and that every real token sees."""
    B, T, _ = x.shape
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    K = 0 if prefix is None else prefix.shape[0]
    mask = torch.arange(K + T)[None, :] > pos[:, None]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        q = rotate_half_split((h @ t[p + "self_attn.q_proj.weight"].T).view(B, T, H, D), pos, theta)
        k = rotate_half_split((h @ t[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D), pos,
                              theta)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D)
        if prefix is not None:
            k = torch.cat([prefix[:, 2 * l][None].expand(B, -1, -1, -1), k], 1)
            v = torch.cat([prefix[:, 2 * l + 1][None].expand(B, -1, -1, -1), v], 1)
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        x = x + torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, T, H * D) @ t[
            p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + (torch.nn.functional.silu(h @ t[p + "mlp.gate_proj.weight"].T) *
                 (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    return rms_norm(x, t["model.norm.weight"], eps) @ t["model.embed_tokens.weight"].T


def peft_prompt_logits(cfg, t, prompt, ids):
    """PeftModelForCausalLM.forward for PROMPT_TUNING: cat(prompt, embed(ids)); real rows."""
    B = ids.shape[0]
    x = torch.cat([prompt[None].expand(B, -1, -1), t["model.embed_tokens.weight"][ids]], 1)
    return hf_llama(cfg, t, x, torch.arange(x.shape[1]))[:, prompt.shape[0]:]


def check_greedy_generate(base, adapter, logits_of, scale):
    """generate --adapter (KV cache) against a float64 recompute of the whole sequence at every
    step (logits_of(ids [1, N]) -> [1, N, V]). A token is compared where the float64 top-2
    margin exceeds twice the logit tolerance 2e-4 * scale; at least 4 of the 8 must be."""
    out = subprocess.run([CLI, "generate", "--model", base, "--adapter", adapter, "--prompt",
                          "alpha ", "--max-new-tokens", "8"], check=True,
                         capture_output=True).stdout
    new = list(out[len(b"alpha "):-1])
    assert len(new) == 8
    seq = [ord(c) for c in "alpha "]
    compared = 0
    with torch.no_grad():
        for tok in new:
            last = logits_of(torch.tensor([seq]))[0, -1]
            top2 = torch.topk(last, 2).values
            if (top2[0] - top2[1]).item() > 4e-4 * scale:
                assert tok == int(last.argmax()), (seq, tok)
                compared += 1
            seq.append(tok)
    assert compared >= 4


def check_resume(out, part, args, files):
    """Training to `part` in two runs (--stop-after 2, then --resume) gives `out`'s files."""
    run("train", "--out", part, "--stop-after", "2", *args)
    run("train", "--out", part, "--resume", "--corpus", args[args.index("--corpus") + 1],
        "--quiet")
    for f in files:
        assert read_file(os.path.join(out, f)) == read_file(os.path.join(part, f)), f


def check_prompt_header(adapter, shape):
    """adapter_model.safetensors: one F32 tensor `prompt_embeddings` of `shape`, format pt."""
    header = safetensors_header(os.path.join(adapter, "adapter_model.safetensors"))
    assert header["__metadata__"]["format"] == "pt"
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()
            if k != "__metadata__"} == {"prompt_embeddings": ("F32", shape)}


def test_prompt_tuning_files_logits_gradients_generate_resume_and_errors():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base = train_base(tmp, corpus)
        adapter, part = os.path.join(tmp, "adapter"), os.path.join(tmp, "part")
        base_files = checkpoint_files(base)
        pt = ["--corpus", corpus, "--init", base, "--steps", "4", "--checkpoint-interval", "2",
              "--lr", "0.05", "--warmup", "1", "--prompt-tuning", str(K),
              "--prompt-tuning-init-text", TEXT, *SHAPE]
        run("train", "--out", adapter, *pt)
        assert checkpoint_files(base) == base_files
        # Resume is bit-exact: adapter, moments and config.
        check_resume(adapter, part, pt, ("adapter_model.safetensors", "optimizer.safetensors",
                                         "adapter_config.json"))

        # adapter_config.json: PEFT's PromptTuningConfig keys, sorted.
        cfg = read_json(os.path.join(adapter, "adapter_config.json"))
        assert list(cfg) == sorted(cfg)
        mcfg = read_json(os.path.join(base, "config.json"))
        d = mcfg["hidden_size"]
        assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["num_virtual_tokens"] == K and cfg["token_dim"] == d
        assert cfg["num_transformer_submodules"] == 1 and cfg["num_layers"] == 2
        assert cfg["num_attention_heads"] == mcfg["num_attention_heads"]
        assert cfg["prompt_tuning_init"] == "TEXT" and cfg["prompt_tuning_init_text"] == TEXT
        assert os.path.samefile(cfg["base_model_name_or_path"], base)

        check_prompt_header(adapter, [K, d])
        prompt = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))[
            "prompt_embeddings"]
        base_t = read_safetensors(os.path.join(base, "model.safetensors"))
        # Trained away from the TEXT init (the embedding rows of "rope ").
        init = base_t["model.embed_tokens.weight"][torch.tensor([ord(c) for c in TEXT])]
        assert (prompt - init).abs().max() > 0

        # Logits and the gradient of prompt_embeddings against the float64 PEFT computation.
        ids, got, g, _ = eval_dump(tmp, base, "--adapter", adapter)
        p = prompt.clone().requires_grad_(True)
        logits = peft_prompt_logits(mcfg, base_t, p, ids[:, :-1])
        next_token_loss(logits, ids).backward()
        assert_within(got, logits.detach(), 2e-4, "logits")
        assert set(g) == {"prompt_embeddings"}
        assert_within(g["prompt_embeddings"], p.grad, 1e-3, "grad", nonzero=True)

        # generate --adapter (KV cache, virtual tokens at entries 0..K-1) against a recompute.
        check_greedy_generate(base, adapter, lambda s: peft_prompt_logits(mcfg, base_t, prompt, s),
                              logits.abs().max().item())

        # Errors name the option and the range.
        merged = os.path.join(tmp, "merged")
        assert "cannot be merged" in fails("merge", "--model", base, "--adapter", adapter,
                                           "--out", merged)
        assert not os.path.exists(os.path.join(merged, "config.json"))
        e = os.path.join(tmp, "e")
        common = ["train", "--corpus", corpus, "--init", base, "--out", e, "--steps", "1", *SHAPE]
        assert "--prompt-tuning 0 (num_virtual_tokens) is outside [1, " in fails(
            *common, "--prompt-tuning", "0")
        assert "cannot be combined" in fails(*common, "--prompt-tuning", "2", "--lora-rank", "2")
        assert "needs --prompt-tuning" in fails(*common, "--prompt-tuning-init-text", "x")
        assert "--qlora" in fails("eval", "--model", base, "--adapter", adapter, "--qlora",
                                  "--text", corpus, "--context", "12")


def hf_llama_with_prefix(cfg, t, ids, table):
    """PEFT PREFIX_TUNING on LLaMA: get_prompt's table [K, L*2*td] viewed [K, L*2, Hkv, D] and
    handed over as past_key_values; cache_position and position_ids K..K+T-1 for the real
    tokens."""
    K, T = table.shape[0], ids.shape[1]
    kv = table.view(K, cfg["num_hidden_layers"] * 2, cfg["num_key_value_heads"], cfg["head_dim"])
    return hf_llama(cfg, t, t["model.embed_tokens.weight"][ids], torch.arange(K, K + T), kv)


def prefix_encoder(enc):
    """PEFT's PrefixEncoder with prefix_projection: Embedding -> Linear -> Tanh -> Linear."""
    z = enc["prompt_encoder.embedding.weight"] @ enc["prompt_encoder.transform.0.weight"].T
    h = torch.tanh(z + enc["prompt_encoder.transform.0.bias"])
    return h @ enc["prompt_encoder.transform.2.weight"].T + enc["prompt_encoder.transform.2.bias"]


def test_prefix_tuning_files_logits_gradients_generate_resume_and_errors():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base = train_base(tmp, corpus)
        plain, proj, part = (os.path.join(tmp, n) for n in ("plain", "proj", "part"))
        base_files = checkpoint_files(base)
        common = ["--corpus", corpus, "--init", base, "--steps", "4", "--lr", "0.02",
                  "--warmup", "1", "--prefix-tuning", "4", *SHAPE]
        run("train", "--out", plain, *common)
        pj = [*common, "--prefix-projection", "--prefix-hidden", "24", "--checkpoint-interval",
              "2"]
        run("train", "--out", proj, *pj)
        assert checkpoint_files(base) == base_files
        check_resume(proj, part, pj, ("adapter_model.safetensors", "optimizer.safetensors",
                                      "adapter_config.json", "prefix_encoder.safetensors"))
        mcfg = read_json(os.path.join(base, "config.json"))
        Hkv, D, L = mcfg["num_key_value_heads"], mcfg["head_dim"], mcfg["num_hidden_layers"]
        td = Hkv * D  # PEFT's GQA rule
        base_t = read_safetensors(os.path.join(base, "model.safetensors"))
        for adapter, projected in ((plain, False), (proj, True)):
            cfg = read_json(os.path.join(adapter, "adapter_config.json"))
            assert list(cfg) == sorted(cfg)
            assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["task_type"] == "CAUSAL_LM"
            assert cfg["num_virtual_tokens"] == 4 and cfg["token_dim"] == td
            assert cfg["num_attention_heads"] == Hkv and cfg["num_layers"] == L
            assert cfg["num_transformer_submodules"] == 1
            assert cfg["prefix_projection"] == projected
            assert cfg["encoder_hidden_size"] == (24 if projected else td)
            check_prompt_header(adapter, [4, L * 2 * td])
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
            # eval of the training directory (projection: the encoder, as --resume loads it).
            ids, got, g, _ = eval_dump(tmp, base, "--adapter", adapter)
            p = table.clone().requires_grad_(True)
            logits = hf_llama_with_prefix(mcfg, base_t, ids[:, :-1],
                                          prefix_encoder(enc) if projected else p)
            next_token_loss(logits, ids).backward()
            assert_within(got, logits.detach(), 2e-4, "logits")
            leaves = enc if projected else {"prompt_embeddings": p}
            assert set(g) == set(leaves)
            for k, leaf in leaves.items():
                assert_within(g[k], leaf.grad, 1e-3, k, nonzero=True)
            # generate --adapter: the prefix in the KV cache, greedy against a recompute.
            check_greedy_generate(base, adapter,
                                  lambda s, tb=table: hf_llama_with_prefix(mcfg, base_t, s, tb),
                                  logits.abs().max().item())
        assert "cannot be merged" in fails("merge", "--model", base, "--adapter", plain, "--out",
                                           os.path.join(tmp, "m"))
        e = ["train", "--corpus", corpus, "--init", base, "--out", os.path.join(tmp, "e"),
             "--steps", "1", *SHAPE]
        assert "cannot be combined" in fails(*e, "--prefix-tuning", "2", "--prompt-tuning", "2")
        assert "needs --prefix-tuning" in fails(*e, "--prefix-projection")
        assert "needs --prefix-projection" in fails(*e, "--prefix-tuning", "2", "--prefix-hidden",
                                                    "8")
        assert "--prefix-tuning 12 (num_virtual_tokens) is outside [1, 11]" in fails(
            *e, "--prefix-tuning", "12")
