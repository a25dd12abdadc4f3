"""LoRA adapters of `ropekit train --lora-rank` against the PEFT format and an independent
float64 LoRA written here.

A tiny base is trained with `ropekit train`, then a LoRA+ adapter on every projection (with the
embeddings and norm gains) for a few steps, so that B is no longer zero. The test reads
adapter_config.json and adapter_model.safetensors as PEFT would (the key names
`base_model.model.<module>.lora_{A,B}.weight`, A [r, in], B [out, r], modules_to_save tensors
under the base module's name), builds W + (lora_alpha / r) B A in float64 (peft's
get_delta_weight) on the independent float64 LLaMA of tiny_llama.py, and compares the
logits and every adapter gradient with `ropekit eval --adapter --dump-logits --dump-grads`.
`ropekit merge` must give the same logits from a plain checkpoint.

Tolerances as in test_model_torch.py (float32 with sums of at most 64 terms per dot product,
~20 forward / ~40 backward ops: 2e-4 of the largest logit, 1e-3 of the largest gradient). The
adapter adds one rank-r product per projection, r = 4 terms, within the same budget. The merged
model and the unmerged adapter are both within 2e-4 of the float64 logits, so of each other
within 4e-4.
"""

import os
import tempfile

import pytest

from tiny_llama import (SHAPE, LlamaTorch, assert_within, checkpoint_files, corpus_file,
                        eval_dump, fails, next_token_loss, read_file, read_json, read_safetensors,
                        run, safetensors_header, train_base)

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 6.0


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


def lora_vs_float64(tmp, base, adapter, targets):
    """eval --adapter --dump-* against the float64 LoRA: checks the logits and every adapter
    gradient; returns the adapter's logits and gradients and the scale of the logits."""
    mcfg = read_json(os.path.join(base, "config.json"))
    tensors = read_safetensors(os.path.join(adapter, "adapter_model.safetensors"))
    ids, got, grads, _ = eval_dump(tmp, base, "--adapter", adapter)
    model = LoraTorch(mcfg, read_safetensors(os.path.join(base, "model.safetensors")), tensors,
                      targets, ALPHA / R)
    logits = model.forward(ids[:, :-1])
    next_token_loss(logits, ids).backward()
    assert_within(got, logits.detach(), 2e-4, "logits")
    assert set(grads) == set(model.lora)
    for k, t in model.lora.items():
        assert_within(grads[k], t.grad, 1e-3, k, nonzero=True)
    return got, grads, logits.abs().max().item()


def train_lora_plus(tmp, corpus, base, name, targets):
    """A LoRA+ adapter (embeddings and norm gains trainable) trained 4 steps into tmp/name."""
    adapter = os.path.join(tmp, name)
    run("train", "--corpus", corpus, "--init", base, "--out", adapter, "--steps", "4",
        "--lr", "0.05", "--warmup", "1", "--lora-rank", str(R), "--lora-alpha", str(ALPHA),
        "--lora-targets", ",".join(targets), "--lora-train-embeddings", "--lora-train-norms",
        *SHAPE)
    return adapter


def check_peft_files(adapter, base):
    """adapter_config.json and adapter_model.safetensors as PEFT writes them."""
    # adapter_config.json: PEFT's LoraConfig keys, sorted as save_pretrained writes them.
    cfg = read_json(os.path.join(adapter, "adapter_config.json"))
    assert list(cfg) == sorted(cfg)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == R and cfg["lora_alpha"] == ALPHA and cfg["lora_dropout"] == 0.0
    assert cfg["target_modules"] == MODULES and cfg["bias"] == "none"
    assert cfg["modules_to_save"] == ["embed_tokens", "input_layernorm",
                                      "post_attention_layernorm", "norm"]
    assert os.path.samefile(cfg["base_model_name_or_path"], base)
    # adapter_model.safetensors: names and shapes as PEFT saves them.
    path = os.path.join(adapter, "adapter_model.safetensors")
    assert safetensors_header(path)["__metadata__"]["format"] == "pt"
    tensors = read_safetensors(path)
    mcfg = read_json(os.path.join(base, "config.json"))
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


def test_adapter_files_logits_gradients_and_merge_match_float64_lora():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base = train_base(tmp, corpus)
        base_files = checkpoint_files(base)
        adapter = train_lora_plus(tmp, corpus, base, "adapter", MODULES)
        assert checkpoint_files(base) == base_files  # the base is untouched
        check_peft_files(adapter, base)
        got, _, scale = lora_vs_float64(tmp, base, adapter, MODULES)

        # merge: a plain checkpoint with the same logits.
        merged = os.path.join(tmp, "merged")
        run("merge", "--model", base, "--adapter", adapter, "--out", merged)
        _, merged_logits, _, _ = eval_dump(tmp, merged, grads=False)
        m_err = (merged_logits - got).abs().max().item()
        assert m_err <= 4e-4 * scale, f"merged logits: max error {m_err:.3g}"
        # merge refuses to replace a checkpoint without --overwrite.
        assert "--overwrite" in fails("merge", "--model", base, "--adapter", adapter, "--out",
                                      merged)


# Sinusoidal and learned positions are added to sqrt(d) * embedding (embedding_scale sqrt_dim),
# so d loss / d embedding = sqrt(d) * d loss / d x_0. The LoRA+ gradients must match the float64
# LoRA (tolerances as above) and, the merged checkpoint being the same function up to one float32
# rounding of each merged weight (relative 2^-24), the merged model's full fine-tuning gradients
# of the embeddings and norm gains: both are within 1e-3 of the float64 gradient's largest value,
# so within 2e-3 of each other. A missing sqrt(d) = 5.7 factor is an O(1) relative error.
@pytest.mark.parametrize("pe", [["--pe", "sinusoidal"], ["--pe", "learned", "--untied"]],
                         ids=["sinusoidal", "learned"])
def test_lora_plus_embedding_gradient_carries_the_embedding_scale(pe):
    with tempfile.TemporaryDirectory() as tmp:
        corpus = corpus_file(tmp)
        base = train_base(tmp, corpus, extra=pe)
        assert read_json(os.path.join(base, "config.json"))["ropekit"]["embedding_scale"] == \
            "sqrt_dim"
        targets = ["q_proj", "v_proj"]
        adapter = train_lora_plus(tmp, corpus, base, "adapter", targets)
        _, grads, _ = lora_vs_float64(tmp, base, adapter, targets)
        merged = os.path.join(tmp, "merged")
        run("merge", "--model", base, "--adapter", adapter, "--out", merged)
        _, _, full, _ = eval_dump(tmp, merged)
        trained = [k for k in grads if "lora_" not in k]
        assert len(trained) == 1 + 2 * 2 + 1
        for k in trained:
            assert_within(grads[k], full[k[len("base_model.model."):]], 2e-3, k, nonzero=True)


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
            err = fails("train", "--corpus", corpus, "--init", base, "--out",
                        os.path.join(tmp, "e"), "--steps", "1", *shape, *args)
            assert needle in err, (args, err)


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
            assert read_file(os.path.join(full, f)) == read_file(os.path.join(part, f)), f
        assert "--overwrite" in fails("train", "--out", full, *lora)
        run("train", "--out", full, "--overwrite", *lora)
