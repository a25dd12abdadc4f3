"""LoRA adapters of `ropekit train --lora-rank` against the PEFT format and an independent
float64 LoRA written here.

A tiny base is trained with `ropekit train`, then a LoRA+ adapter on every projection (with the
embeddings and norm gains) for a few steps, so that B is no longer zero. The test reads
adapter_config.json and adapter_model.safetensors as PEFT would (the key names
`base_model.model.<module>.lora_{A,B}.weight`, A [r, in], B [out, r], modules_to_save tensors
under the base module's name), builds W + (lora_alpha / r) B A in float64 (peft's
get_delta_weight) on the independent float64 LLaMA of test_model_torch.py, and compares the
logits and every adapter gradient with `ropekit eval --adapter --dump-logits --dump-grads`.
`ropekit merge` must give the same logits from a plain checkpoint.

Tolerances as in test_model_torch.py (float32 with sums of at most 64 terms per dot product,
~20 forward / ~40 backward ops: 2e-4 of the largest logit, 1e-3 of the largest gradient). The
adapter adds one rank-r product per projection, r = 4 terms, within the same budget. The merged
model and the unmerged adapter are both within 2e-4 of the float64 logits, so of each other
within 4e-4.
"""

import json
import os
import struct
import subprocess
import tempfile

import numpy as np
import torch

from test_model_torch import CLI, LlamaTorch, corpus_file, read_safetensors

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 6.0


def run(*args):
    return subprocess.run([CLI, *args], check=True, capture_output=True, text=True)


def module_path(l, m):
    return f"model.layers.{l}." + ("self_attn." if m.endswith(("q_proj", "k_proj", "v_proj",
                                                               "o_proj")) else "mlp.") + m


class LoraTorch(LlamaTorch):
    """The base tensors frozen, the adapter's as leaves; W' = W + s B A per adapted module."""

    def __init__(self, cfg, base, adapter, targets, scaling):
        super().__init__(cfg, base)
        self.lora = {k: v.clone().requires_grad_(True) for k, v in adapter.items()}
        self.targets, self.scaling = targets, scaling

    def forward(self, ids):
        base = self.t
        merged = dict(base)
        for l in range(self.cfg["num_hidden_layers"]):
            for m in self.targets:
                p = "base_model.model." + module_path(l, m)
                w = module_path(l, m) + ".weight"
                merged[w] = base[w] + self.scaling * (self.lora[p + ".lora_B.weight"] @
                                                      self.lora[p + ".lora_A.weight"])
        for k, v in self.lora.items():
            if "lora_" not in k:  # modules_to_save: the trained copy replaces the base tensor
                merged[k[len("base_model.model."):]] = v
        self.t = merged
        try:
            return super().forward(ids)
        finally:
            self.t = base


def test_adapter_files_logits_gradients_and_merge_match_float64_lora():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base, adapter, merged = (os.path.join(tmp, n) for n in ("base", "adapter", "merged"))
        shape = ["--batch-size", "2", "--seq-len", "12", "--quiet"]
        run("train", "--corpus", corpus, "--out", base, "--steps", "4", "--hidden-size", "32",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate-size", "40",
            "--lr", "0.02", "--warmup", "1", "--init-std", "0.1", *shape)
        base_files = {f: open(os.path.join(base, f), "rb").read()
                      for f in ("config.json", "model.safetensors")}
        run("train", "--corpus", corpus, "--init", base, "--out", adapter, "--steps", "4",
            "--lr", "0.05", "--warmup", "1", "--lora-rank", str(R), "--lora-alpha", str(ALPHA),
            "--lora-targets", ",".join(MODULES), "--lora-train-embeddings", "--lora-train-norms",
            *shape)
        # The base checkpoint is untouched.
        for f, data in base_files.items():
            assert open(os.path.join(base, f), "rb").read() == data, f

        # adapter_config.json: PEFT's LoraConfig keys, sorted as save_pretrained writes them.
        text = open(os.path.join(adapter, "adapter_config.json")).read()
        cfg = json.loads(text)
        assert list(cfg) == sorted(cfg)
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["lora_dropout"] == 0.0
        assert cfg["target_modules"] == MODULES and cfg["bias"] == "none"
        assert cfg["modules_to_save"] == ["embed_tokens", "input_layernorm",
                                          "post_attention_layernorm", "norm"]
        assert os.path.samefile(cfg["base_model_name_or_path"], base)

        # adapter_model.safetensors: names and shapes as PEFT saves them.
        raw = open(os.path.join(adapter, "adapter_model.safetensors"), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        assert header["__metadata__"]["format"] == "pt"
        tensors = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))
        with open(os.path.join(base, "config.json")) as f:
            mcfg = json.load(f)
        d, F = mcfg["hidden_size"], mcfg["intermediate_size"]
        hq = mcfg["num_attention_heads"] * mcfg["head_dim"]
        hk = mcfg["num_key_value_heads"] * mcfg["head_dim"]
        dims = {"q_proj": (d, hq), "k_proj": (d, hk), "v_proj": (d, hk), "o_proj": (hq, d),
                "gate_proj": (d, F), "up_proj": (d, F), "down_proj": (F, d)}
        want = {"base_model.model.model.embed_tokens.weight": [256, d],
                "base_model.model.model.norm.weight": [d]}
        for l in range(2):
            for m in MODULES:
                p = "base_model.model." + module_path(l, m)
                want[p + ".lora_A.weight"] = [R, dims[m][0]]
                want[p + ".lora_B.weight"] = [dims[m][1], R]
            for nrm in ("input_layernorm", "post_attention_layernorm"):
                want[f"base_model.model.model.layers.{l}.{nrm}.weight"] = [d]
        assert {k: list(v.shape) for k, v in tensors.items()} == want
        assert all(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)

        # Logits and adapter gradients against the float64 LoRA.
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 256, size=(3, 13)).astype(np.int32)
        tok_path = os.path.join(tmp, "tokens.npy")
        np.save(tok_path, tokens)
        logits_path = os.path.join(tmp, "logits.npy")
        grads_path = os.path.join(tmp, "grads.safetensors")
        run("eval", "--model", base, "--adapter", adapter, "--dump-tokens", tok_path,
            "--dump-logits", logits_path, "--dump-grads", grads_path)
        model = LoraTorch(mcfg, read_safetensors(os.path.join(base, "model.safetensors")), tensors,
                          MODULES, ALPHA / R)
        ids = torch.from_numpy(tokens.astype(np.int64))
        logits = model.forward(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        loss.backward()
        got = torch.from_numpy(np.load(logits_path).astype(np.float64))
        scale = logits.abs().max().item()
        err = (got - logits.detach()).abs().max().item()
        assert err <= 2e-4 * scale, f"logits: max error {err:.3g}, scale {scale:.3g}"
        grads = read_safetensors(grads_path)
        assert set(grads) == set(model.lora)
        for k, t in model.lora.items():
            g_scale = t.grad.abs().max().item()
            g_err = (grads[k] - t.grad).abs().max().item()
            assert g_scale > 0, k
            assert g_err <= 1e-3 * g_scale, f"{k}: max error {g_err:.3g}, scale {g_scale:.3g}"

        # merge: a plain checkpoint with the same logits.
        run("merge", "--model", base, "--adapter", adapter, "--out", merged)
        merged_logits = os.path.join(tmp, "merged.npy")
        run("eval", "--model", merged, "--dump-tokens", tok_path, "--dump-logits", merged_logits)
        m_err = np.abs(np.load(merged_logits).astype(np.float64) - got.numpy()).max()
        assert m_err <= 4e-4 * scale, f"merged logits: max error {m_err:.3g}"
        # merge refuses to replace a checkpoint without --overwrite.
        again = subprocess.run([CLI, "merge", "--model", base, "--adapter", adapter, "--out",
                                merged], capture_output=True, text=True)
        assert again.returncode != 0 and "--overwrite" in again.stderr


def test_qlora_trains_and_reports_its_bits_and_errors_name_the_option():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base, q = os.path.join(tmp, "base"), os.path.join(tmp, "q")
        shape = ["--batch-size", "2", "--seq-len", "12"]
        run("train", "--corpus", corpus, "--out", base, "--steps", "2", "--hidden-size", "64",
            "--layers", "1", "--heads", "4", "--kv-heads", "2", "--intermediate-size", "128",
            "--quiet", *shape)
        out = run("train", "--corpus", corpus, "--init", base, "--out", q, "--steps", "2",
                  "--lora-rank", "4", "--qlora", *shape)
        # 64 x 64 and 128 x 64 matrices: 4 + 8/64 bits per weight, plus per matrix one float32
        # second-level absmax (at most 256 scales) and one float32 offset: 64 bits of 4096 or
        # 8192 weights, so between 4.133 and 4.141 bits.
        line = [x for x in out.stderr.splitlines() if x.startswith("QLoRA:")][0]
        bits = float(line.split("projections ")[1].split()[0])
        assert 4.125 < bits < 4.2, line
        run("eval", "--model", base, "--adapter", q, "--qlora", "--text", corpus, "--context",
            "12")
        for args, needle in [
            (["--lora-rank", "4", "--lora-targets", "q_proj,attn"], "unknown module 'attn'"),
            (["--lora-rank", "0"], "--lora-rank 0 is outside [1,"),
            (["--lora-rank", "4", "--bf16"], "--bf16"),
            (["--qlora"], "--qlora: needs --lora-rank"),
        ]:
            r = subprocess.run([CLI, "train", "--corpus", corpus, "--init", base, "--out",
                                os.path.join(tmp, "e"), "--steps", "1", *shape, *args],
                               capture_output=True, text=True)
            assert r.returncode != 0 and needle in r.stderr, (args, r.stderr)


def test_adapter_resume_is_bit_exact_and_outputs_are_not_replaced_silently():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base = os.path.join(tmp, "base")
        shape = ["--batch-size", "2", "--seq-len", "12", "--quiet"]
        run("train", "--corpus", corpus, "--out", base, "--steps", "2", "--hidden-size", "32",
            "--layers", "1", "--heads", "4", "--kv-heads", "2", "--intermediate-size", "40", *shape)
        lora = ["--corpus", corpus, "--init", base, "--steps", "4", "--checkpoint-interval", "2",
                "--lora-rank", "2", "--lora-dropout", "0.1", "--lora-train-norms", *shape]
        full, part = os.path.join(tmp, "full"), os.path.join(tmp, "part")
        run("train", "--out", full, *lora)
        run("train", "--out", part, "--stop-after", "2", *lora)
        run("train", "--out", part, "--resume", "--corpus", corpus, "--quiet")
        for f in ("adapter_model.safetensors", "optimizer.safetensors", "adapter_config.json"):
            assert open(os.path.join(full, f), "rb").read() == open(os.path.join(part, f),
                                                                    "rb").read(), f
        r = subprocess.run([CLI, "train", "--out", full, *lora], capture_output=True, text=True)
        assert r.returncode != 0 and "--overwrite" in r.stderr
        run("train", "--out", full, "--overwrite", *lora)
