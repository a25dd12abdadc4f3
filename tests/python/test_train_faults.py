"""Fault injection into `ropekit train`: a checkpoint commits as one unit.

The hook in the library (ROPEKIT_FAULT_AT=N) fires at the N-th file operation of the process
(create, write, fsync, rename, mkdir, symlink, directory sync, removal of the previous step).
For EVERY operation of every save of a short run, the run is killed there (SIGKILL) or the
operation fails as on a full disk; then `--resume` must either continue to weights, optimizer
state and --log bit-identical to an uninterrupted run, or refuse with a clear error (only
possible before the first save committed). A silent mix is never accepted.

Also: a second writer is refused while the first holds the directory, an existing checkpoint or
log is never overwritten without --overwrite, and an unwritable --out is found before training.
"""

import fcntl
import os
import shutil
import subprocess
import tempfile

import pytest

CLI = os.environ.get("ROPEKIT_CLI")
if not CLI:
    raise RuntimeError("ROPEKIT_CLI is not set: point it at the built `ropekit` binary")

TINY = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--intermediate-size", "32", "--seq-len", "16", "--batch-size", "2", "--eval-interval",
        "0", "--quiet", "--steps", "4", "--checkpoint-interval", "2"]
PARTS = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def run(args, env=None):
    full_env = dict(os.environ)
    for k in ("ROPEKIT_FAULT_AT", "ROPEKIT_FAULT_MODE", "ROPEKIT_FAULT_TRACE"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=full_env)


@pytest.fixture(scope="module")
def ref():
    """An uninterrupted run: its corpus, its files and the number of fault points it passes."""
    tmp = tempfile.mkdtemp()
    corpus = os.path.join(tmp, "c.txt")
    with open(corpus, "w") as f:
        f.write("".join(f"line {i} of a small corpus for fault tests.\n" for i in range(200)))
    out, log = os.path.join(tmp, "ref"), os.path.join(tmp, "ref.jsonl")
    r = run(["train", "--corpus", corpus, "--out", out, "--log", log, *TINY],
            env={"ROPEKIT_FAULT_TRACE": "1"})
    assert r.returncode == 0, r.stderr
    points = [line for line in r.stderr.splitlines() if line.startswith("fault point ")]
    files = {name: read(os.path.join(out, name)) for name in PARTS}
    yield {"tmp": tmp, "corpus": corpus, "files": files, "log": read(log), "points": points}
    shutil.rmtree(tmp)


def test_the_hook_sees_every_operation_of_a_save(ref):
    ops = [p.split()[3] for p in ref["points"]]
    # Two saves (steps 2 and 4): each writes 5 files (create, write, fsync, rename each), syncs
    # the step directory and switches `current` (symlink + rename) and syncs the directory.
    for op in ("mkdir", "create", "write", "fsync", "rename", "fsync-dir", "symlink", "remove"):
        assert op in ops, op
    assert ops.count("mkdir") == 2
    assert len(ops) >= 2 * (1 + 5 * 4 + 1 + 2 + 1)


def check_outcome(ref, out, log, mode, k):
    """After a fault at operation k: resume, then compare with the uninterrupted run."""
    r = run(["train", "--corpus", ref["corpus"], "--out", out, "--log", log, "--resume"])
    if r.returncode != 0:
        # Only acceptable when nothing was committed yet, and it must say so.
        assert "holds no checkpoint" in r.stderr, f"{mode} at {k}: {r.stderr}"
        r = run(["train", "--corpus", ref["corpus"], "--out", out, "--log", log, "--overwrite",
                 *TINY])
        assert r.returncode == 0, f"{mode} at {k}: {r.stderr}"
        outcome = "refused"
    else:
        outcome = "resumed"
    for name in PARTS:
        assert read(os.path.join(out, name)) == ref["files"][name], f"{mode} at {k}: {name}"
    assert read(log) == ref["log"], f"{mode} at {k}: the log differs"
    leftovers = [n for n in os.listdir(out) if ".tmp." in n or
                 (n.startswith("step-") and os.path.realpath(os.path.join(out, n)) !=
                  os.path.realpath(os.path.join(out, "current")))]
    assert not leftovers, f"{mode} at {k}: {leftovers}"
    return outcome


@pytest.mark.parametrize("mode", ["kill", "enospc"])
def test_fault_at_every_file_operation_then_resume(ref, mode):
    outcomes = {"resumed": 0, "refused": 0}
    first_commit = next(i + 1 for i, p in enumerate(ref["points"])
                        if p.split()[3] == "rename" and p.endswith("/current"))
    for k in range(1, len(ref["points"]) + 1):
        case = os.path.join(ref["tmp"], f"{mode}-{k}")
        out, log = case + ".ck", case + ".jsonl"
        r = run(["train", "--corpus", ref["corpus"], "--out", out, "--log", log, *TINY],
                env={"ROPEKIT_FAULT_AT": str(k), "ROPEKIT_FAULT_MODE": mode})
        if mode == "kill":
            assert r.returncode == -9, f"kill at {k}: exit {r.returncode}, {r.stderr}"
        elif r.returncode != 0:
            # A failed write stops the run with an error naming the file and the cause.
            assert "No space left on device" in r.stderr and out in r.stderr, r.stderr
        else:
            # Only the removal of the previous step may fail without stopping the run (it
            # happens after the commit and is retried at the next save).
            assert ref["points"][k - 1].split()[3] == "remove", r.stderr
        outcome = check_outcome(ref, out, log, mode, k)
        # The first commit is the rename of `current` (its fault fires before the rename):
        # every fault after it must resume, every fault up to it finds nothing committed.
        assert outcome == ("resumed" if k > first_commit else "refused"), (k, outcome)
        outcomes[outcome] += 1
        shutil.rmtree(out)
    print(mode, outcomes)


def test_existing_checkpoint_and_log_are_not_overwritten(ref):
    out, log = os.path.join(ref["tmp"], "keep"), os.path.join(ref["tmp"], "keep.jsonl")
    assert run(["train", "--corpus", ref["corpus"], "--out", out, "--log", log,
                *TINY]).returncode == 0
    before = {name: read(os.path.join(out, name)) for name in PARTS}
    r = run(["train", "--corpus", ref["corpus"], "--out", out, *TINY, "--seed", "7"])
    assert r.returncode == 1 and "already holds a checkpoint" in r.stderr
    assert "--overwrite" in r.stderr and "--resume" in r.stderr
    other = os.path.join(ref["tmp"], "other")
    r = run(["train", "--corpus", ref["corpus"], "--out", other, "--log", log, *TINY])
    assert r.returncode == 1 and "--log" in r.stderr and "already exists" in r.stderr
    assert {name: read(os.path.join(out, name)) for name in PARTS} == before
    assert read(log) == ref["log"]
    # A Hugging Face model directory (plain files) is protected the same way.
    hf = os.path.join(ref["tmp"], "hf")
    os.mkdir(hf)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(out, name), os.path.join(hf, name))
    r = run(["train", "--corpus", ref["corpus"], "--out", hf, *TINY])
    assert r.returncode == 1 and "already holds a checkpoint" in r.stderr
    r = run(["train", "--corpus", ref["corpus"], "--out", out, "--log", log, "--overwrite",
             *TINY, "--seed", "7"])
    assert r.returncode == 0, r.stderr
    assert read(os.path.join(out, "model.safetensors")) != before["model.safetensors"]


def test_second_writer_is_refused_with_the_holders_pid(ref):
    out = os.path.join(ref["tmp"], "locked")
    os.mkdir(out)
    with open(os.path.join(out, ".ropekit.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{os.getpid()}\n")
        f.flush()
        r = run(["train", "--corpus", ref["corpus"], "--out", out, *TINY])
        assert r.returncode == 1, r.stderr
        assert out in r.stderr and f"pid {os.getpid()}" in r.stderr and "in use" in r.stderr
    assert run(["train", "--corpus", ref["corpus"], "--out", out, *TINY]).returncode == 0


def make_read_only(path):
    """chmod 555; as root (which ignores modes) the immutable attribute. False if impossible."""
    os.chmod(path, 0o555)
    probe = os.path.join(path, "probe")
    try:
        open(probe, "w").close()
    except OSError:
        return True
    os.remove(probe)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", path]).returncode == 0:
        try:
            open(probe, "w").close()
        except OSError:
            return True
        os.remove(probe)
        subprocess.run(["chattr", "-i", path])
    return False


def undo_read_only(path):
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", path], capture_output=True)
    os.chmod(path, 0o755)


def test_unwritable_out_is_found_before_training(ref):
    out = os.path.join(ref["tmp"], "readonly")
    os.mkdir(out)
    if not make_read_only(out):
        undo_read_only(out)
        pytest.skip("cannot make a read-only directory here")
    try:
        # 10^6 steps would take minutes: the error must come before the first one.
        args = TINY[:TINY.index("--steps")] + ["--steps", "1000000"]
        r = subprocess.run([CLI, "train", "--corpus", ref["corpus"], "--out", out, *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "--out" in r.stderr and out in r.stderr, r.stderr
        assert "not writable" in r.stderr or "lock" in r.stderr, r.stderr
        assert "final step" not in r.stdout
    finally:
        undo_read_only(out)
