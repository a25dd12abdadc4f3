"""Data-parallel `mpirun -np N ropekit train`: bit-identical to one process with --grad-accum,
checkpoints that resume on another rank count, and a rank that dies or hangs stopping the run.

Every run is tiny (a 2-layer d=32 model, a few steps), so each mpirun takes seconds; every
subprocess has a timeout, so a hang fails the test instead of blocking the suite."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import uuid

import numpy as np
import pytest

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")
MPIEXEC = os.environ.get("ROPEKIT_MPIEXEC", "")
if not MPIEXEC:
    pytest.skip("ropekit was built without MPI (ROPEKIT_WITH_MPI)", allow_module_level=True)

MODEL = ["--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--intermediate-size", "48", "--batch-size", "2", "--seq-len", "16", "--warmup", "2",
         "--lr", "0.01", "--eval-interval", "2", "--eval-batches", "2", "--quiet"]
TIMEOUT = 120  # seconds for one run; the runs take a few seconds


def mpi_env(tag=None):
    env = dict(os.environ)
    # Ranks share the cores here, and containers may forbid cross-process memory attach.
    env["OMPI_MCA_btl_vader_single_copy_mechanism"] = "none"
    env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    if tag:
        env["ROPEKIT_TEST_TAG"] = tag
    return env


def mpirun_cmd(n, args):
    cmd = [MPIEXEC, "--oversubscribe", "--bind-to", "none", "-np", str(n)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")  # CI containers run as root
    return cmd + [CLI, *args]


def run(*args):
    return subprocess.run([CLI, *args], check=True, capture_output=True, text=True,
                          timeout=TIMEOUT)


def mpirun(n, *args):
    r = subprocess.run(mpirun_cmd(n, args), capture_output=True, text=True, timeout=TIMEOUT,
                       env=mpi_env())
    assert r.returncode == 0, r.stderr
    return r


def corpus(tmp):
    rng = np.random.default_rng(5)
    words = ["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dogs. "]
    path = os.path.join(tmp, "corpus.txt")
    with open(path, "w") as f:
        f.write("".join(words[i] for i in rng.integers(0, len(words), 3000)))
    return path


def read(path):
    with open(path, "rb") as f:
        return f.read()


def same_checkpoint(a, b):
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert read(os.path.join(a, name)) == read(os.path.join(b, name)), name


@pytest.mark.parametrize("ranks,accum,extra", [
    (1, 1, []),
    (2, 2, []),
    (3, 3, ["--grad-clip", "0.05"]),                # clipping: the global norm must agree
    (4, 4, ["--untied", "--pe", "learned"]),        # head and position table buckets
    (3, 5, ["--bf16", "--pe", "t5", "--t5-buckets", "8"]),  # uneven split: 1, 2, 2 micro-batches
])
def test_ranks_are_bit_identical_to_grad_accum(ranks, accum, extra):
    with tempfile.TemporaryDirectory() as tmp:
        text = corpus(tmp)
        one, many = os.path.join(tmp, "one"), os.path.join(tmp, "many")
        base = ["--corpus", text, "--steps", "4", *MODEL, *extra]
        common = [*base, "--grad-accum", str(accum)]
        run("train", "--out", one, "--log", one + ".jsonl", *common)
        mpirun(ranks, "train", "--out", many, "--log", many + ".jsonl", *common)
        same_checkpoint(one, many)
        assert read(one + ".jsonl") == read(many + ".jsonl")  # losses, norms, validation
        if ranks > 1:
            # The comparison can fail: one micro-batch per step gives other weights.
            fewer = os.path.join(tmp, "fewer")
            run("train", "--out", fewer, *base, "--grad-accum", "1")
            assert read(os.path.join(fewer, "model.safetensors")) != \
                read(os.path.join(one, "model.safetensors"))


def test_zero1_shards_the_optimizer_state():
    with tempfile.TemporaryDirectory() as tmp:
        text = corpus(tmp)
        stats = os.path.join(tmp, "stats.json")
        mpirun(4, "train", "--corpus", text, "--out", os.path.join(tmp, "c"), "--steps", "2",
               "--grad-accum", "4", "--dist-stats", stats, *MODEL)
        s = json.loads(read(stats))
        assert s["ranks"] == 4 and s["steps"] == 2
        total = s["optimizer_floats_unsharded"][0]
        # Shards are whole 1024-float chunks: each holds at most ceil(chunks / 4) of them.
        chunks = -(-total // 2 // 1024)
        assert sum(s["optimizer_floats"]) == total
        for held in s["optimizer_floats"]:
            assert 0 < held <= 2 * 1024 * -(-chunks // 4)
        # Every rank sends gradient pieces to the three other shard owners each step.
        assert all(sent > 0 for sent in s["grad_floats_sent"])


def test_resume_on_another_rank_count_stays_bit_identical():
    with tempfile.TemporaryDirectory() as tmp:
        text = corpus(tmp)
        one, many = os.path.join(tmp, "one"), os.path.join(tmp, "many")
        common = ["--corpus", text, "--steps", "6", "--grad-accum", "6",
                  "--checkpoint-interval", "3", *MODEL]
        run("train", "--out", one, "--log", one + ".jsonl", *common)
        mpirun(2, "train", "--out", many, "--log", many + ".jsonl", "--stop-after", "3", *common)
        assert json.loads(read(os.path.join(many, "trainer_state.json")))["step"] == 3
        mpirun(3, "train", "--out", many, "--resume", "--quiet", "--log", many + ".jsonl",
               "--corpus", text)
        same_checkpoint(one, many)
        assert read(one + ".jsonl") == read(many + ".jsonl")


def rank_pids(tag, rank):
    """PIDs of this test's ropekit processes launched as `rank` (found by an environment tag)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = read(f"/proc/{entry}/environ").split(b"\0")
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if (f"ROPEKIT_TEST_TAG={tag}".encode() in env and
                f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and
                os.path.basename(exe) == "ropekit"):
            pids.append(int(entry))
    return pids


def start_long_run(tmp, extra):
    text = corpus(tmp)
    out = os.path.join(tmp, "run")
    tag = uuid.uuid4().hex
    no_eval = [("0" if prev == "--eval-interval" else x) for prev, x in zip([""] + MODEL, MODEL)]
    args = ["train", "--corpus", text, "--out", out, "--steps", "100000", "--grad-accum", "3",
            "--checkpoint-interval", "2", *no_eval, *extra]
    proc = subprocess.Popen(mpirun_cmd(3, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=mpi_env(tag))
    state = os.path.join(out, "trainer_state.json")
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(state) or not rank_pids(tag, 1):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run did not write a checkpoint"
        time.sleep(0.1)
    return proc, out, tag


def stop_and_check(proc, out, tag, bound_s):
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        for r in range(3):
            for pid in rank_pids(tag, r):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
        pytest.fail(f"the other ranks did not stop within {bound_s} s")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 1" in err, err
    # The last committed checkpoint still loads and continues (one process).
    step = json.loads(read(os.path.join(out, "trainer_state.json")))["step"]
    assert step >= 2
    run("train", "--out", out, "--resume", "--steps", str(step + 1), "--corpus",
        os.path.join(os.path.dirname(out), "corpus.txt"), "--quiet")
    return err, elapsed


def test_killed_rank_stops_the_others():
    with tempfile.TemporaryDirectory() as tmp:
        proc, out, tag = start_long_run(tmp, [])
        for pid in rank_pids(tag, 1):
            os.kill(pid, signal.SIGKILL)
        stop_and_check(proc, out, tag, 60)


def test_hung_rank_times_out_with_its_name():
    with tempfile.TemporaryDirectory() as tmp:
        proc, out, tag = start_long_run(tmp, ["--comm-timeout", "3"])
        stopped = rank_pids(tag, 1)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            err, elapsed = stop_and_check(proc, out, tag, 60)
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Our own timeout fired (mpirun does not notice a stopped rank). The first rank to time
        # out names the rank it waited for: the stopped rank 1, or rank 2 when rank 0's wait on
        # rank 2 (itself blocked on rank 1) expires first; which comes first is a race.
        assert re.search(r"no progress for 3 s waiting for .* from/to rank [12]:", err), err
        assert elapsed < 30


def study_corpus(tmp):
    # Text for the micro preset: the training corpus twice over (the last file is held out).
    text = corpus(tmp)
    held = os.path.join(tmp, "held_out.txt")
    with open(held, "w") as f:
        f.write(read(text).decode()[::-1])
    return [text, held]


def same_records(a, b):
    """results.json of two studies: the same records but for the fine-tunes' wall times."""
    def records(out):
        with open(os.path.join(out, "results.json")) as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in json.load(f)]
    return records(a) == records(b)


def test_study_on_ranks_matches_one_process_and_reruns_reuse():
    with tempfile.TemporaryDirectory() as tmp:
        files = study_corpus(tmp)
        one, many = os.path.join(tmp, "one"), os.path.join(tmp, "many")
        args = ["study", "--preset", "micro", "--threads", "1", "--corpus", *files]
        run(*args, "--out", one)
        r = mpirun(3, *args, "--out", many)
        assert r.stdout.count("runs computed") == 1, r.stdout  # rank 0 reports, once
        assert "\n0 runs computed" not in r.stdout, r.stdout
        for name in ("results.csv", "curves.json"):
            assert read(os.path.join(one, name)) == read(os.path.join(many, name)), name
        assert same_records(one, many)
        for unit in os.listdir(os.path.join(one, "runs")):
            ckpt = os.path.join(one, "runs", unit, "ckpt", "model.safetensors")
            if os.path.exists(ckpt):
                assert read(ckpt) == read(ckpt.replace(one, many)), unit
        # A rerun on another rank count trains nothing and gives the same results.
        done = {u: os.stat(os.path.join(many, "runs", u, "DONE")).st_mtime_ns
                for u in os.listdir(os.path.join(many, "runs"))}
        r = mpirun(2, *args, "--out", many)
        assert "\n0 runs computed" in r.stdout, r.stdout
        for u, mtime in done.items():
            assert os.stat(os.path.join(many, "runs", u, "DONE")).st_mtime_ns == mtime, u
        assert same_records(one, many)
