"""Sizes and counts from the command line or a file are checked before use: each bad value gets
one `ropekit: error:` line naming the option (or file) and the accepted range, quickly, never a
crash, an overflow, a huge allocation or a NaN. Deeply nested JSON is refused wherever it is read.
"""

import json
import math
import os
import shutil
import subprocess
import tempfile

import pytest

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")

TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--intermediate-size", "32", "--seq-len", "16", "--eval-interval", "0", "--quiet"]
HUGE = "9223372036854775807"
DEEP = "[" * 100000 + "]" * 100000


def run(*args, timeout=30):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def fails(r, *words):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ropekit: error:"), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


@pytest.fixture(scope="module")
def ws():
    tmp = tempfile.mkdtemp()
    text = os.path.join(tmp, "c.txt")
    with open(text, "w") as f:
        f.write("".join(f"sentence number {i} of the limits corpus. " for i in range(300)))
    model = os.path.join(tmp, "m")
    r = run("train", "--corpus", text, "--out", model, "--steps", "2", "--batch-size", "2", *TINY)
    assert r.returncode == 0, r.stderr
    # The same checkpoint as plain files (what a Hugging Face directory looks like), to edit.
    plain = os.path.join(tmp, "plain")
    os.mkdir(plain)
    for name in ("config.json", "model.safetensors", "optimizer.safetensors",
                 "trainer_state.json"):
        shutil.copy(os.path.realpath(os.path.join(model, name)), os.path.join(plain, name))
    yield {"tmp": tmp, "text": text, "model": model, "plain": plain}
    shutil.rmtree(tmp)


def test_generate_max_new_tokens(ws):
    fails(run("generate", "--model", ws["model"], "--prompt", "x", "--max-new-tokens", HUGE),
          "--max-new-tokens", "16777216")


@pytest.mark.parametrize("option,value,words", [
    ("--batch-size", "4611686018427387904", ["--batch-size", "1048576"]),
    ("--batch-size", "8000000", ["--batch-size", "1048576"]),
    ("--grad-accum", "4611686018427387904", ["--grad-accum", "1048576"]),
    ("--batch-size", "100000", ["--batch-size x --seq-len", "1048576"]),
])
def test_train_sizes(ws, option, value, words):
    out = os.path.join(ws["tmp"], "never")
    fails(run("train", "--corpus", ws["text"], "--out", out, "--steps", "2", *TINY, option,
              value), *words)


def edited_copy(ws, name, edit):
    d = tempfile.mkdtemp(dir=ws["tmp"])
    for f in os.listdir(ws["plain"]):
        shutil.copy(os.path.join(ws["plain"], f), os.path.join(d, f))
    path = os.path.join(d, name)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(edit(text))
    return d


def test_trainer_state_sizes_and_integers(ws):
    def set_batch(text):
        j = json.loads(text)
        j["train_config"]["batch_size"] = 4611686018427387904
        return json.dumps(j)

    d = edited_copy(ws, "trainer_state.json", set_batch)
    fails(run("train", "--corpus", ws["text"], "--out", d, "--resume", "--steps", "4"),
          "trainer_state.json", "batch_size")
    d = edited_copy(ws, "trainer_state.json", lambda t: t.replace('"step": 2', '"step": 2.7'))
    fails(run("train", "--corpus", ws["text"], "--out", d, "--resume", "--steps", "4"),
          "trainer_state.json", "step must be an integer")


def test_eval_sizes(ws):
    m, t = ws["model"], ws["text"]
    fails(run("eval", "--model", m, "--text", t, "--context", HUGE), "--context")
    fails(run("eval", "--model", m, "--text", t, "--tail-windows", "1000000000000"),
          "--tail-windows")
    fails(run("eval", "--model", m, "--text", t, "--tail", "0"), "--tail", ">= 1")


def test_plain_eval_of_a_short_context_model_uses_a_shorter_tail(ws):
    # The model was trained at context 16, under the tail default of 64.
    r = run("eval", "--model", ws["model"], "--text", ws["text"], "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res[0]["context"] == 16 and math.isfinite(res[0]["tail_loss"])


def test_config_larger_than_its_weights_fails_before_allocating(ws):
    d = edited_copy(ws, "config.json", lambda t: t.replace('"hidden_size": 16',
                                                           '"hidden_size": 4096'))
    r = run("eval", "--model", d, "--text", ws["text"], timeout=10)
    fails(r, "model.safetensors", "implies at least")


def test_deep_json_is_refused_everywhere(ws):
    # A command-line argument is limited to 128 KiB: 1000 levels there.
    fails(run("eval", "--model", ws["model"], "--text", ws["text"], "--rope-scaling",
              '{"rope_type": ' + "[" * 1000 + "]" * 1000 + "}"), "--rope-scaling",
          "nesting deeper than 64")
    d = edited_copy(ws, "config.json", lambda t: t[:-2] + ', "x": ' + DEEP + "}\n")
    fails(run("eval", "--model", d, "--text", ws["text"]), "config.json",
          "nesting deeper than 64")
    d = edited_copy(ws, "trainer_state.json", lambda t: t[:-2] + ', "x": ' + DEEP + "}\n")
    fails(run("train", "--corpus", ws["text"], "--out", d, "--resume"), "trainer_state.json",
          "nesting deeper than 64")
