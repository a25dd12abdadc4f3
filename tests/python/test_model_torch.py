"""The ropekit LLaMA model against an independent PyTorch LLaMA written here in float64.

A tiny checkpoint is trained for a few steps with `ropekit train` (so the norms and weights are
not at their initial values), read back with the small safetensors reader of tiny_llama.py, and run through
`LlamaTorch` (tiny_llama.py), written from the papers (RMSNorm, SwiGLU, GQA attention, and each position
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

import os
import subprocess
import tempfile

import pytest

from tiny_llama import (CLI, LlamaTorch, assert_within, corpus_file, eval_dump, next_token_loss,
                        read_json, read_safetensors, t5_bucket, train_base)


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_gradients_match_torch(name):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train_base(tmp, corpus_file(tmp), "ckpt", CASES[name])
        ids, got, grads, out = eval_dump(tmp, ckpt)
        loss_rk = float(out.split()[1])
        cfg = read_json(os.path.join(ckpt, "config.json"))
        model = LlamaTorch(cfg, read_safetensors(os.path.join(ckpt, "model.safetensors")))
        logits = model.forward(ids[:, :-1])
        loss = next_token_loss(logits, ids)
        loss.backward()
        assert_within(got, logits.detach(), 2e-4, "logits")
        assert abs(loss_rk - loss.item()) <= 2e-4 * loss.item()
        assert set(grads) == set(model.t), (set(grads) ^ set(model.t))
        for k, tt in model.t.items():
            assert_within(grads[k], tt.grad, 1e-3, k)


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
