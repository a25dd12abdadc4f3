"""Black-box tests of `ropekit study` with the micro preset.

One micro study is run into a temporary directory (a few seconds in a Release build); the tests
then check its records, training curves and report, rerun it to check that finished runs are
reused (no retraining: markers and checkpoints keep their bytes and modification times, the log
says so), resume a unit whose completion marker is gone, refuse an output directory made with
another configuration, and render the report in headless Chromium. The comparison of fine-tuning
methods (full, LoRA, LoRA+, QLoRA) is checked against parameter counts computed here from the
model's shape, and a study finished before the comparison existed must gain only its new units.

The corpus is text from this repository (the headers for training, the design notes held out),
so no download is needed.
"""

import csv
import glob
import json
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib

import numpy as np
import pytest

CLI = os.environ.get("ROPEKIT_CLI")
SRC = os.environ.get("ROPEKIT_SOURCE_DIR")
if not CLI or not SRC:
    raise RuntimeError("ROPEKIT_CLI and ROPEKIT_SOURCE_DIR must be set (ctest sets them)")

ENCODINGS = ["learned", "sinusoidal", "none", "rope", "alibi", "t5"]
SCALINGS = ["linear", "ntk", "dynamic", "yarn", "llama3"]
FT_SCALINGS = ["none", "linear", "yarn", "llama3"]
FT_STEPS = [5, 10]
L = 16
LENGTHS = [16, 32, 64, 128]
PLOTS = ["plot-tail-loss", "plot-window-loss", "plot-position-loss", "plot-extension",
         "plot-finetune", "plot-finetune-train", "plot-methods", "plot-methods-train",
         "plot-pretrain", "plot-decay", "plot-decay-scaled"]
PI_KEEPS = [0, 1, 2, 4, 8]  # head_dim 16: 8 pairs
EXPERIMENTS = ["pretrain-t5-published", "pretrain-alibi-heads"]
# The method comparison: full fine-tuning is the finetune-<scaling>-<k> units above.
METHODS = ["lora-qv", "lora-all", "lora-plus", "qlora"]
METHOD_SCALINGS = ["yarn", "linear"]
METHOD_UNITS = [f"finetune-{s}-{m}-{k}" for s in METHOD_SCALINGS for m in METHODS
                for k in FT_STEPS]
UNITS = ([f"pretrain-{e}" for e in ENCODINGS] + [f"extend-{s}" for s in SCALINGS] +
         [f"finetune-{s}-{k}" for s in FT_SCALINGS for k in FT_STEPS] + EXPERIMENTS +
         [f"extend-pi-keep{k}" for k in PI_KEEPS] + METHOD_UNITS)


def corpus():
    train = sorted(glob.glob(os.path.join(SRC, "include", "ropekit", "*.h")))
    held_out = os.path.join(SRC, "docs", "DESIGN.md")
    assert train and os.path.isfile(held_out)
    return train + [held_out]


def run_study(out, seed=1, check=True):
    cmd = [CLI, "study", "--preset", "micro", "--out", out, "--threads", "2", "--seed", str(seed),
           "--corpus", *corpus()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def snapshot(out):
    """(size, mtime_ns) of every completion marker and checkpoint weight file."""
    files = glob.glob(os.path.join(out, "runs", "*", "DONE"))
    files += glob.glob(os.path.join(out, "runs", "*", "ckpt", "model.safetensors"))
    files += glob.glob(os.path.join(out, "runs", "*", "ckpt", "adapter_model.safetensors"))
    return {f: (os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def study():
    root = tempfile.mkdtemp(prefix="ropekit_study_")
    out = os.path.join(root, "out")
    first = run_study(out)
    yield out, first
    shutil.rmtree(root, ignore_errors=True)


def load_records(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_every_planned_run_has_finite_records(study):
    out, _ = study
    records = load_records(out)
    keys = {"encoding", "scaling", "finetune_steps", "train_length", "eval_length", "tail_loss",
            "window_loss", "seed"}
    for r in records:
        assert keys <= r.keys()
        assert math.isfinite(r["tail_loss"]) and r["tail_loss"] > 0, r
        assert math.isfinite(r["window_loss"]) and r["window_loss"] > 0, r
        assert r["train_length"] == L and r["seed"] == 1
        assert all(math.isfinite(v) for v in r["position_loss"])
    got = sorted((r["encoding"], r["scaling"], r["finetune_steps"], r["eval_length"],
                  r.get("variant", ""), r.get("method", "")) for r in records)
    want = [(e, "none", 0, n, "", "") for e in ENCODINGS for n in LENGTHS]
    want += [("rope", s, 0, n, "", "") for s in SCALINGS for n in LENGTHS]
    want += [("rope", s, k, n, "", "full") for s in FT_SCALINGS for k in FT_STEPS
             for n in LENGTHS]
    want += [("rope", s, k, n, "", m) for s in METHOD_SCALINGS for m in METHODS
             for k in FT_STEPS for n in LENGTHS]
    want += [("t5", "none", 0, n, "max_distance=4", "") for n in LENGTHS]
    want += [("alibi", "none", 0, n, "heads=4", "") for n in LENGTHS]
    want += [("rope", "linear", 0, n, f"pi_keep={k}", "") for k in PI_KEEPS for n in LENGTHS]
    assert got == sorted(want)
    # Position curves cover the whole window in buckets.
    for r in records:
        assert len(r["position_loss"]) == r["eval_length"] // r["bucket_size"]
    # Plain RoPE under every scaling is the same model at the training length (s = 1).
    at_l = {r["scaling"]: r["tail_loss"] for r in records
            if r["encoding"] == "rope" and r["finetune_steps"] == 0 and r["eval_length"] == L}
    assert len(set(at_l.values())) == 1, at_l


def test_csv_matches_json(study):
    out, _ = study
    records = load_records(out)
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for row, r in zip(rows, records):
        for k in ("encoding", "scaling"):
            assert row[k] == r[k]
        assert row["variant"] == r.get("variant", "")
        assert row["method"] == r.get("method", "")
        for k in ("finetune_steps", "train_length", "eval_length", "seed"):
            assert int(row[k]) == r[k]
        for k in ("tail_loss", "window_loss"):
            assert float(row[k]) == r[k]


def test_training_losses_are_finite_and_fall(study):
    out, _ = study
    with open(os.path.join(out, "curves.json")) as f:
        curves = {c["name"]: c for c in json.load(f)}
    for e in ENCODINGS:
        loss = [v for _, v in curves[f"pretrain-{e}"]["loss"]]
        assert len(loss) == 100 and all(math.isfinite(v) for v in loss)
        # From ln(256) = 5.55 at initialisation to well below it.
        assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 1.0, (e, loss[:10], loss[-10:])
        # Held-out loss well below ln(256), the loss of a uniform prediction. (Its first value,
        # at step 20, is already trained; from there the micro model's 2 validation batches are
        # too noisy for a trend, which moves with the corpus: this repository's own text.)
        val = [v for _, v in curves[f"pretrain-{e}"]["val_loss"]]
        assert all(math.isfinite(v) for v in val)
        assert val[-1] < math.log(256) - 1.0, (e, val)
    for s in FT_SCALINGS:
        steps = [k for k, _ in curves[f"finetune-{s}"]["loss"]]
        assert steps == list(range(1, FT_STEPS[-1] + 1))
    for s in METHOD_SCALINGS:
        for m in METHODS:
            loss = curves[f"methods-{s}-{m}"]["loss"]
            assert [k for k, _ in loss] == list(range(1, FT_STEPS[-1] + 1))
            assert all(math.isfinite(v) for _, v in loss)


def test_report_references_every_plot(study):
    out, first = study
    with open(os.path.join(out, "report.html")) as f:
        html = f.read()
    assert html.startswith("<!DOCTYPE html>")
    for plot in PLOTS:
        assert f'<svg id="{plot}"' in html, plot
    assert html.count("<svg") == len(PLOTS)
    # Self-contained: no scripts, no external resources.
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert "<table>" in html
    # The terminal shows the summary tables.
    assert "Tail loss" in first.stdout and "RoPE fine-tuned" in first.stdout
    for e in ["learned APE", "sinusoidal", "NoPE", "RoPE", "ALiBi", "T5 bias"]:
        assert e in first.stdout


def test_rerun_reuses_finished_runs(study):
    out, _ = study
    before = snapshot(out)
    trained = (len(ENCODINGS) + len(FT_SCALINGS) * len(FT_STEPS) + len(EXPERIMENTS) +
               len(METHOD_UNITS))
    assert len(before) == len(UNITS) + trained
    with open(os.path.join(out, "results.json")) as f:
        results_before = f.read()
    p = run_study(out)
    assert "step " not in p.stderr  # no training step was taken
    for u in UNITS:
        assert f"{u}: finished earlier, reusing" in p.stderr, u
    assert f"0 runs computed, {len(UNITS)} reused" in p.stdout
    assert snapshot(out) == before
    with open(os.path.join(out, "results.json")) as f:
        assert f.read() == results_before


# ---- The fine-tuning methods ---------------------------------------------------------------------

# The micro model (study.h: "micro"): d 32, 1 layer, 2 query / 1 KV heads of 16, SwiGLU 64, 256
# byte tokens, tied embeddings; LoRA rank 8 (plan.cc).
D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, RANK = 32, 1, 2, 1, 16, 64, 256, 8
# (in, out) of q, k, v, o, gate, up, down (nn.Linear weights are [out, in]).
PROJ = {"q_proj": (D, HEADS * HEAD_DIM), "k_proj": (D, KV_HEADS * HEAD_DIM),
        "v_proj": (D, KV_HEADS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, D),
        "gate_proj": (D, FFN), "up_proj": (D, FFN), "down_proj": (FFN, D)}
NORMS = [D] * (2 * LAYERS + 1)  # input and post-attention norm per layer, final norm


def trainable_tensor_sizes(method):
    """Element counts of the trainable tensors of each method, from the model's shape."""
    if method == "full":
        return ([VOCAB * D] + [i * o for _ in range(LAYERS) for i, o in PROJ.values()] + NORMS)
    targets = ["q_proj", "v_proj"] if method == "lora-qv" else list(PROJ)
    sizes = [n for _ in range(LAYERS) for t in targets
             for n in (RANK * PROJ[t][0], PROJ[t][1] * RANK)]  # A [r, in], B [out, r]
    if method == "lora-plus":  # LongLoRA's LoRA+: embeddings (tied head) and norm gains too
        sizes += [VOCAB * D] + NORMS
    return sizes


def test_methods_report_parameters_optimizer_memory_and_time(study):
    out, first = study
    records = [r for r in load_records(out) if r["seed"] == 1 and "seeds" not in r]
    for method in ["full"] + METHODS:
        sizes = trainable_tensor_sizes(method)
        # AdamW keeps m and v in float32 for every element of the trainable buffer, whose tensors
        # start at multiples of 16 floats (the model's tensor alignment).
        state_bytes = 2 * 4 * sum((n + 15) // 16 * 16 for n in sizes)
        scalings = FT_SCALINGS if method == "full" else METHOD_SCALINGS
        for sc in scalings:
            chain = sorted((r for r in records if r.get("method") == method and
                            r["scaling"] == sc), key=lambda r: r["finetune_steps"])
            assert len(chain) == len(FT_STEPS) * len(LENGTHS), (method, sc)
            for r in chain:
                assert r["trainable_parameters"] == sum(sizes), (method, r)
                assert r["optimizer_bytes"] == state_bytes, (method, r)
                assert r["seconds"] > 0
            # Wall time accumulates along the chain of fine-tunes.
            seconds = [r["seconds"] for r in chain if r["eval_length"] == 4 * L]
            assert seconds == sorted(seconds) and seconds[0] < seconds[-1]
    # Records without fine-tuning have no method.
    assert all("method" not in r for r in records if r["finetune_steps"] == 0)
    # The LoRA fine-tunes change the model: their losses differ from the scaled model's and from
    # one another's.
    at = lambda m, sc: [r["tail_loss"] for r in records if r.get("method") == m and
                        r["scaling"] == sc and r["eval_length"] == 4 * L]
    for sc in METHOD_SCALINGS:
        assert len({tuple(at(m, sc)) for m in ["full"] + METHODS}) == 1 + len(METHODS)
    assert "Fine-tuning methods at 64" in first.stdout
    for label in ["full fine-tuning", "LoRA q,v", "LoRA all", "LoRA+ (emb., norms)",
                  "QLoRA (all, NF4)"]:
        assert label in first.stdout


def test_method_units_train_adapters_on_the_frozen_base(study):
    out, _ = study
    for sc in METHOD_SCALINGS:
        for m in METHODS:
            ckpt = os.path.join(out, "runs", f"finetune-{sc}-{m}-{FT_STEPS[-1]}", "ckpt")
            with open(os.path.join(ckpt, "adapter_config.json")) as f:
                config = json.load(f)
            assert config["peft_type"] == "LORA" and config["r"] == RANK
            want = ["q_proj", "v_proj"] if m == "lora-qv" else list(PROJ)
            assert sorted(config["target_modules"]) == sorted(want)
            saved = config["modules_to_save"] or []
            assert bool(saved) == (m == "lora-plus"), saved
            with open(os.path.join(ckpt, "trainer_state.json")) as f:
                assert json.load(f)["adapter"]["qlora"] == (m == "qlora")
            assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))


# The fingerprints of units that existed before the method comparison, as the study wrote them
# then (captured from the micro preset). A study started earlier is resumed only if they stay
# byte for byte the same; the corpus numbers depend on this repository's text and are masked.
OLD_FINGERPRINTS = {
    "pretrain-rope": """{
 "study_format": 1,
 "preset": "micro",
 "seed": 1,
 "corpus": {
  "train_bytes": 0,
  "held_out_bytes": 0,
  "fnv1a": 0
 },
 "eval": {
  "multipliers": [
   1,
   2,
   4,
   8
  ],
  "tail_windows": 8,
  "tail": 8,
  "max_windows": 8,
  "bucket_size": 4
 },
 "unit": "pretrain-rope",
 "model": {
  "vocab_size": 256,
  "hidden_size": 32,
  "num_layers": 1,
  "num_heads": 2,
  "num_kv_heads": 1,
  "head_dim": 16,
  "intermediate_size": 64,
  "rms_norm_eps": 1e-05,
  "tie_word_embeddings": true,
  "max_position_embeddings": 16,
  "init_std": 0.02,
  "pe": "rope",
  "embedding_scale": "none",
  "max_positions": 0,
  "num_buckets": 16,
  "max_distance": 16,
  "rope": {
   "type": "default",
   "base": 10000.0,
   "rotary_dim": 16,
   "factor": 0.0,
   "ntk_alpha": 1.0,
   "original_max_position_embeddings": 0,
   "low_freq_factor": 1.0,
   "high_freq_factor": 4.0,
   "layout": "neox",
   "numerics": "exact"
  }
 },
 "train": {
  "steps": 100,
  "batch_size": 8,
  "seq_len": 16,
  "grad_accum": 1,
  "lr": 0.01,
  "min_lr": 0.001,
  "warmup_steps": 10,
  "schedule": "cosine",
  "beta1": 0.9,
  "beta2": 0.95,
  "eps": 1e-08,
  "weight_decay": 0.1,
  "grad_clip": 1.0,
  "data_seed": 1,
  "eval_interval": 20,
  "eval_batches": 2,
  "checkpoint_interval": 20
 }
}
""",
    "finetune-yarn-10": """{
 "study_format": 1,
 "preset": "micro",
 "seed": 1,
 "corpus": {
  "train_bytes": 0,
  "held_out_bytes": 0,
  "fnv1a": 0
 },
 "eval": {
  "multipliers": [
   1,
   2,
   4,
   8
  ],
  "tail_windows": 8,
  "tail": 8,
  "max_windows": 8,
  "bucket_size": 4
 },
 "unit": "finetune-yarn-10",
 "model": {
  "vocab_size": 256,
  "hidden_size": 32,
  "num_layers": 1,
  "num_heads": 2,
  "num_kv_heads": 1,
  "head_dim": 16,
  "intermediate_size": 64,
  "rms_norm_eps": 1e-05,
  "tie_word_embeddings": true,
  "max_position_embeddings": 16,
  "init_std": 0.02,
  "pe": "rope",
  "embedding_scale": "none",
  "max_positions": 0,
  "num_buckets": 16,
  "max_distance": 16,
  "rope": {
   "type": "yarn",
   "base": 10000.0,
   "rotary_dim": 16,
   "factor": 4.0,
   "ntk_alpha": 1.0,
   "original_max_position_embeddings": 16,
   "low_freq_factor": 1.0,
   "high_freq_factor": 4.0,
   "layout": "neox",
   "numerics": "exact"
  }
 },
 "train": {
  "steps": 10,
  "batch_size": 2,
  "seq_len": 64,
  "grad_accum": 1,
  "lr": 0.001,
  "min_lr": 0.001,
  "warmup_steps": 2,
  "schedule": "constant",
  "beta1": 0.9,
  "beta2": 0.95,
  "eps": 1e-08,
  "weight_decay": 0.0,
  "grad_clip": 1.0,
  "data_seed": 7920,
  "eval_interval": 5,
  "eval_batches": 2,
  "checkpoint_interval": 5
 },
 "extra": "fine-tune from finetune-yarn-5"
}
""",
}


def mask_corpus(fingerprint):
    return re.sub(r'"(train_bytes|held_out_bytes|fnv1a)": \d+', r'"\1": 0', fingerprint)


def test_fingerprints_of_earlier_units_are_unchanged(study):
    out, _ = study
    for unit, want in OLD_FINGERPRINTS.items():
        for name in ("fingerprint.json", "DONE"):
            with open(os.path.join(out, "runs", unit, name)) as f:
                assert mask_corpus(f.read()) == want, (unit, name)


def test_study_without_methods_gains_only_the_method_units(study, tmp_path):
    """A study finished before the comparison: its units are reused, the methods added."""
    out, _ = study
    old = str(tmp_path / "old")
    shutil.copytree(out, old, symlinks=True)
    for u in METHOD_UNITS:  # what a study of the earlier version holds: everything else
        shutil.rmtree(os.path.join(old, "runs", u))
    before = snapshot(old)
    p = run_study(old)
    for u in UNITS:
        if u in METHOD_UNITS:
            assert f"{u}: finished earlier" not in p.stderr, u
            assert os.path.isfile(os.path.join(old, "runs", u, "DONE")), u
        else:
            assert f"{u}: finished earlier, reusing" in p.stderr, u
    assert f"{len(METHOD_UNITS)} runs computed, {len(UNITS) - len(METHOD_UNITS)} reused" in p.stdout
    after = snapshot(old)
    assert {f: v for f, v in after.items() if f in before} == before
    # The same records as the study that ran everything at once (wall times aside).
    seed1 = lambda rs: [r for r in rs if r["seed"] == 1 and "seeds" not in r]
    assert without_seconds(seed1(load_records(old))) == without_seconds(seed1(load_records(out)))
    # The report and its Markdown tables come from the old and the new units together.
    md = subprocess.run([CLI, "study", "--report-only", "--markdown", "--out", old],
                        capture_output=True, text=True, timeout=60)
    assert md.returncode == 0, md.stderr
    table = md.stdout[md.stdout.index("Fine-tuning methods at 64"):]
    table = table[:table.index("\n\n", table.index("|"))]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(METHOD_SCALINGS) * (1 + len(METHODS))  # header + rows
    full_params = sum(trainable_tensor_sizes("full"))
    for m, label in [("full", "full fine-tuning"), ("lora-qv", "LoRA q,v"),
                     ("lora-plus", "LoRA+ (emb., norms)")]:
        n = sum(trainable_tensor_sizes(m))
        row = next(r for r in rows if f"| YaRN | {label} |" in r)
        assert f"| {n:,} ({100 * n / full_params:.1f}%) |" in row, row
    with open(os.path.join(old, "report.html")) as f:
        html = f.read()
    for plot in ["plot-methods", "plot-methods-train"]:
        assert f'<svg id="{plot}"' in html


def test_unfinished_unit_is_resumed_and_reproduced(study):
    out, _ = study
    with open(os.path.join(out, "results.json")) as f:
        results_before = f.read()
    unit = os.path.join(out, "runs", "finetune-yarn-10")
    os.remove(os.path.join(unit, "DONE"))  # as if interrupted after its last checkpoint
    os.remove(os.path.join(unit, "records.json"))
    p = run_study(out)
    assert "finetune-yarn-10: resuming from step 10" in p.stderr
    assert f"1 runs computed, {len(UNITS) - 1} reused" in p.stdout
    assert os.path.isfile(os.path.join(unit, "DONE"))
    # Deterministic: the same records; the fine-tunes' wall times include the resumed unit's.
    with open(os.path.join(out, "results.json")) as f:
        assert without_seconds(json.load(f)) == without_seconds(json.loads(results_before))


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_other_configuration_is_refused(study):
    out, _ = study
    before = snapshot(out)
    p = run_study(out, seed=2, check=False)
    assert p.returncode == 1
    assert "different configuration" in p.stderr
    assert snapshot(out) == before


def test_bad_preset_is_an_error():
    p = subprocess.run([CLI, "study", "--preset", "huge", "--out", tempfile.mkdtemp()],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "micro, quick, full" in p.stderr


# ---- Headless browser ---------------------------------------------------------------------------

def decode_png(data):
    """Decodes an 8-bit RGB/RGBA PNG (no interlace) into an [H, W, C] uint8 array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color, _, _, interlace = ihdr
    assert depth == 8 and color in (2, 6) and interlace == 0, ihdr
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * bpp)
    img = np.zeros((h, w * bpp), np.int32)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        f, x = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            row = x
        elif f == 1:  # Sub: running sum per channel
            row = np.cumsum(x.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            row = (x + prev) % 256
        else:  # Average or Paeth: sequential in the byte index (plain ints are fastest here)
            xs, up, out = x.tolist(), prev.tolist(), [0] * (w * bpp)
            for i in range(w * bpp):
                a = out[i - bpp] if i >= bpp else 0
                b = up[i]
                if f == 3:
                    pred = (a + b) >> 1
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                out[i] = (xs[i] + pred) & 255
            row = np.array(out, np.int32)
        img[y] = row
        prev = row
    return img.reshape(h, w, bpp).astype(np.uint8)


def chromium_args(profile):
    return ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (scripts/setup.sh installs it)")
def test_report_renders_in_headless_chromium(study):
    out, _ = study
    url = "file://" + os.path.abspath(os.path.join(out, "report.html"))
    with tempfile.TemporaryDirectory() as tmp:
        shot = os.path.join(tmp, "report.png")
        p = subprocess.run(chromium_args(os.path.join(tmp, "p1")) + [
            "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
            "--window-size=1200,3000", url], capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stderr[-2000:]
        for bad in ("Uncaught", "CONSOLE"):
            assert bad not in p.stderr, p.stderr[-2000:]
        with open(shot, "rb") as f:
            png = f.read()
        assert len(png) > 50_000
        img = decode_png(png)
        assert img.shape[:2] == (3000, 1200)
        colours = np.unique(img[:, :, :3].reshape(-1, 3), axis=0)
        assert len(colours) > 200, len(colours)  # text, lines in several colours, antialiasing
        # Not blank: a good share of the page is drawn on.
        assert (img[:, :, :3].min(axis=2) < 200).mean() > 0.02
        dom = subprocess.run(chromium_args(os.path.join(tmp, "p2")) + ["--dump-dom", url],
                             capture_output=True, text=True, timeout=180)
        assert dom.returncode == 0, dom.stderr[-2000:]
        for plot in PLOTS:
            assert f'<svg id="{plot}"' in dom.stdout, plot
        assert dom.stdout.count("<path") >= 20


def test_report_only_rewrites_the_same_report(study):
    out, _ = study
    with open(os.path.join(out, "report.html"), "rb") as f:
        report = f.read()
    os.remove(os.path.join(out, "report.html"))
    p = subprocess.run([CLI, "study", "--report-only", "--out", out], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "step " not in p.stderr and "Tail loss" in p.stdout
    with open(os.path.join(out, "report.html"), "rb") as f:
        assert f.read() == report


T95_DOF1 = 12.706  # Student's t, two-sided 95%, 1 degree of freedom (standard tables)


def test_second_seed_extends_the_study_with_means_and_intervals(study):
    out, _ = study
    before = load_records(out)
    p = subprocess.run([CLI, "study", "--preset", "micro", "--out", out, "--threads", "2",
                        "--seed", "1", "--seeds", "2", "--corpus", *corpus()],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # The first seed's runs are reused; the second seed's are new, in runs/seed-2/.
    assert f"{len(UNITS)} runs computed, {len(UNITS)} reused" in p.stdout
    for u in UNITS:
        assert os.path.isfile(os.path.join(out, "runs", "seed-2", u, "DONE")), u
    records = load_records(out)
    seed1 = [r for r in records if "seeds" not in r and r["seed"] == 1]
    seed2 = [r for r in records if "seeds" not in r and r["seed"] == 2]
    aggregates = [r for r in records if "seeds" in r]
    assert seed1 == before
    assert len(seed2) == len(before) == len(aggregates)
    key = lambda r: (r["encoding"], r["scaling"], r["scaling_factor"], r["finetune_steps"],
                     r["eval_length"], r.get("variant", ""), r.get("method", ""))
    second = {key(r): r for r in seed2}
    differ = 0
    for a, r1 in zip(aggregates, seed1):
        r2 = second[key(r1)]
        assert key(a) == key(r1) and a["seeds"] == 2
        for field in ["tail_loss", "window_loss"]:
            pair = np.array([r1[field], r2[field]])
            assert a[field] == pytest.approx(pair.mean(), rel=1e-12, abs=1e-15)
            assert a[field + "_sd"] == pytest.approx(pair.std(ddof=1), rel=1e-9, abs=1e-15)
        sd = np.std([r1["tail_loss"], r2["tail_loss"]], ddof=1)
        assert a["tail_loss_ci95"] == pytest.approx(T95_DOF1 * sd / math.sqrt(2), rel=1e-9,
                                                    abs=1e-15)
        differ += r1["tail_loss"] != r2["tail_loss"]
    assert differ > len(seed1) // 2  # another seed trains other models
    assert " ± " in p.stdout  # the tables show mean ± sd


def test_experiments_published_settings_and_partial_pi(study):
    out, first = study
    records = [r for r in load_records(out) if r["seed"] == 1 and "seeds" not in r]
    scaling = lambda variant: "linear" if variant.startswith("pi_keep") else "none"
    by = lambda enc, variant: {r["eval_length"]: r for r in records
                               if r["encoding"] == enc and r.get("variant", "") == variant
                               and r["scaling"] == scaling(variant) and r["finetune_steps"] == 0}
    # T5 with max_distance L / 4 and ALiBi with 4 heads (the micro model has 2) trained their own
    # models: other losses than the study's settings, at every length.
    for enc, variant, config_key, value in [("t5", "max_distance=4", None, None),
                                            ("alibi", "heads=4", "num_attention_heads", 4)]:
        ours, theirs = by(enc, ""), by(enc, variant)
        assert sorted(theirs) == LENGTHS
        assert all(theirs[c]["tail_loss"] != ours[c]["tail_loss"] for c in LENGTHS)
        unit = "pretrain-" + ("t5-published" if enc == "t5" else "alibi-heads")
        with open(os.path.join(out, "runs", unit, "ckpt", "config.json")) as f:
            config = json.load(f)
        if config_key:
            assert config[config_key] == value
    # k = N pairs kept is plain RoPE: the pretrained model's own records, bit for bit.
    plain = by("rope", "")
    kept_all = by("rope", "pi_keep=8")
    for c in LENGTHS:
        assert kept_all[c]["tail_loss"] == plain[c]["tail_loss"]
    # k = 0 is PI: the same angles as extend-linear up to float32 rounding of the frequencies
    # (theta/s against 1/(s base^(2j/R)): one rounding each, <= 2^-23 relative, so the angles at
    # positions < 128 differ by < 2e-5 rad), far below the loss differences between methods.
    pi = {r["eval_length"]: r for r in records
          if r["scaling"] == "linear" and r["finetune_steps"] == 0 and "variant" not in r}
    kept_none = by("rope", "pi_keep=0")
    for c in LENGTHS:
        assert kept_none[c]["tail_loss"] == pytest.approx(pi[c]["tail_loss"], abs=1e-4)
    assert "Published settings" in first.stdout and "PI on all but" in first.stdout
