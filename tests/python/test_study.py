"""Black-box tests of `ropekit study` with the micro preset.

One micro study is run into a temporary directory (a few seconds in a Release build); the tests
then check its records, training curves and report, rerun it to check that finished runs are
reused (no retraining: markers and checkpoints keep their bytes and modification times, the log
says so), resume a unit whose completion marker is gone, refuse an output directory made with
another configuration, and render the report in headless Chromium.

The corpus is text from this repository (the headers for training, the design notes held out),
so no download is needed.
"""

import csv
import glob
import json
import math
import os
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
         "plot-finetune", "plot-finetune-train", "plot-pretrain", "plot-decay",
         "plot-decay-scaled"]
PI_KEEPS = [0, 1, 2, 4, 8]  # head_dim 16: 8 pairs
EXPERIMENTS = ["pretrain-t5-published", "pretrain-alibi-heads"]
UNITS = ([f"pretrain-{e}" for e in ENCODINGS] + [f"extend-{s}" for s in SCALINGS] +
         [f"finetune-{s}-{k}" for s in FT_SCALINGS for k in FT_STEPS] + EXPERIMENTS +
         [f"extend-pi-keep{k}" for k in PI_KEEPS])


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
                  r.get("variant", "")) for r in records)
    want = [(e, "none", 0, n, "") for e in ENCODINGS for n in LENGTHS]
    want += [("rope", s, 0, n, "") for s in SCALINGS for n in LENGTHS]
    want += [("rope", s, k, n, "") for s in FT_SCALINGS for k in FT_STEPS for n in LENGTHS]
    want += [("t5", "none", 0, n, "max_distance=4") for n in LENGTHS]
    want += [("alibi", "none", 0, n, "heads=4") for n in LENGTHS]
    want += [("rope", "linear", 0, n, f"pi_keep={k}") for k in PI_KEEPS for n in LENGTHS]
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
        val = [v for _, v in curves[f"pretrain-{e}"]["val_loss"]]
        assert val[-1] < val[0] and all(math.isfinite(v) for v in val)
    for s in FT_SCALINGS:
        steps = [k for k, _ in curves[f"finetune-{s}"]["loss"]]
        assert steps == list(range(1, FT_STEPS[-1] + 1))


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
    trained = len(ENCODINGS) + len(FT_SCALINGS) * len(FT_STEPS) + len(EXPERIMENTS)
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
    with open(os.path.join(out, "results.json")) as f:
        assert f.read() == results_before  # deterministic: the same records


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
                     r["eval_length"], r.get("variant", ""))
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
