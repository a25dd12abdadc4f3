"""`ropekit generate --context-shift`: generation continues past the KV cache size (dropping old
non-sink tokens and re-rotating the cached keys), deterministically for every thread count, and a
prompt longer than the context is an error that names both lengths."""

import os
import subprocess
import tempfile

import numpy as np

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")

MODEL = ["--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--intermediate-size", "48", "--batch-size", "2", "--seq-len", "16", "--warmup", "2",
         "--lr", "0.01", "--eval-interval", "3", "--eval-batches", "2", "--quiet"]


def test_generate_with_context_shift_runs_past_the_context():
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(3)
        words = ["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs. "]
        text = os.path.join(tmp, "corpus.txt")
        with open(text, "w") as f:
            f.write("".join(words[i] for i in rng.integers(0, len(words), 3000)))
        m = os.path.join(tmp, "m")
        subprocess.run([CLI, "train", "--corpus", text, "--out", m, "--steps", "3", *MODEL],
                       check=True, capture_output=True)
        base = [CLI, "generate", "--model", m, "--prompt", "the quick ", "--max-new-tokens",
                "100", "--context-shift", "--n-keep", "2", "--seed", "5", "--temperature", "0.8"]
        args = base + ["--context", "16"]
        outs = [subprocess.run(args + ["--threads", str(t)], check=True,
                               capture_output=True).stdout for t in (1, 2)]
        assert outs[0] == outs[1]
        assert outs[0].startswith(b"the quick ") and len(outs[0]) == 10 + 100 + 1
        r = subprocess.run(base + ["--context", "8"], capture_output=True, text=True)
        assert r.returncode != 0
        assert "prompt (10 tokens) is longer than the context (8)" in r.stderr
