"""Fault injection into `ropekit study --preset micro`, and what a study output directory accepts.

* Killed (SIGKILL through the library's ROPEKIT_FAULT_AT hook) at chosen file operations: the
  first checkpoint commit of a run and the operation right after it, a run's completion marker,
  an operation in the middle, the removal of a previous checkpoint step and the final
  results.json. A rerun must finish with curves.json byte-identical to an uninterrupted study,
  and results.json too but for the fine-tunes' wall times ("seconds": an interrupted unit's
  time is the time of its resumed part).
* The corpus fingerprint covers the text: one changed byte (same size) is refused, never reused.
* A second study writing the same directory is refused with the holder's pid.
"""

import fcntl
import glob
import json
import os
import shutil
import subprocess
import tempfile

import pytest

CLI = os.environ.get("ROPEKIT_CLI")
SRC = os.environ.get("ROPEKIT_SOURCE_DIR")
if not CLI or not SRC:
    raise RuntimeError("ROPEKIT_CLI and ROPEKIT_SOURCE_DIR must be set (ctest sets them)")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def run_study(out, corpus, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ROPEKIT_FAULT")}
    full_env.update(env or {})
    return subprocess.run([CLI, "study", "--preset", "micro", "--out", out, "--threads", "2",
                           "--seed", "1", "--corpus", *corpus], capture_output=True, text=True,
                          timeout=300, env=full_env)


@pytest.fixture(scope="module")
def ref():
    tmp = tempfile.mkdtemp(prefix="ropekit_study_faults_")
    # A private copy of the corpus (this repository's headers and design notes).
    corpus = []
    for src in sorted(glob.glob(os.path.join(SRC, "include", "ropekit", "*.h"))) + [
            os.path.join(SRC, "docs", "DESIGN.md")]:
        dst = os.path.join(tmp, os.path.basename(src))
        shutil.copy(src, dst)
        corpus.append(dst)
    out = os.path.join(tmp, "ref")
    p = run_study(out, corpus, env={"ROPEKIT_FAULT_TRACE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    points = [line.split(maxsplit=4)[2:] for line in p.stderr.splitlines()
              if line.startswith("fault point ")]  # [n:, op, path]
    yield {"tmp": tmp, "corpus": corpus, "out": out, "points": points,
           "results": read(os.path.join(out, "results.json")),
           "curves": read(os.path.join(out, "curves.json"))}
    shutil.rmtree(tmp, ignore_errors=True)


def records_without_wall_times(data):
    records = json.loads(data)
    assert any("seconds" in r for r in records)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def pick_points(points):
    def first(pred):
        return next(i + 1 for i, (_, op, path) in enumerate(points) if pred(op, path))

    commit = first(lambda op, path: op == "rename" and path.endswith("/ckpt/current"))
    done = first(lambda op, path: op == "rename" and path.endswith("/DONE"))
    removes = [i + 1 for i, (_, op, _p) in enumerate(points) if op == "remove"]
    results = first(lambda op, path: op == "rename" and path.endswith("/results.json"))
    return sorted({commit, commit + 1, done, len(points) // 2, removes[len(removes) // 2],
                   results})


def test_killed_study_reruns_to_the_same_results(ref):
    for k in pick_points(ref["points"]):
        out = os.path.join(ref["tmp"], f"kill-{k}")
        p = run_study(out, ref["corpus"], env={"ROPEKIT_FAULT_AT": str(k),
                                               "ROPEKIT_FAULT_MODE": "kill"})
        assert p.returncode == -9, (k, p.returncode, p.stderr[-2000:])
        p = run_study(out, ref["corpus"])
        assert p.returncode == 0, (k, p.stderr[-3000:])
        assert (records_without_wall_times(read(os.path.join(out, "results.json"))) ==
                records_without_wall_times(ref["results"])), k
        assert read(os.path.join(out, "curves.json")) == ref["curves"], k
        assert not glob.glob(os.path.join(out, "**", "*.tmp.*"), recursive=True), k
        shutil.rmtree(out)


def test_one_changed_corpus_byte_is_never_reused(ref):
    out = os.path.join(ref["tmp"], "changed")
    shutil.copytree(ref["out"], out, symlinks=True)
    changed = [os.path.join(ref["tmp"], "changed-" + os.path.basename(c)) for c in ref["corpus"]]
    for src, dst in zip(ref["corpus"], changed):
        shutil.copy(src, dst)
    # One byte of the held-out text, same size: only the content differs.
    data = bytearray(read(changed[-1]))
    data[len(data) // 2] ^= 0x01
    with open(changed[-1], "wb") as f:
        f.write(data)
    p = run_study(out, changed)
    assert "reusing" not in p.stderr
    assert p.returncode == 1 and "different configuration" in p.stderr, p.stderr[-2000:]
    # The same for one byte of the training text.
    shutil.copy(ref["corpus"][-1], changed[-1])
    data = bytearray(read(changed[0]))
    data[0] ^= 0x01
    with open(changed[0], "wb") as f:
        f.write(data)
    p = run_study(out, changed)
    assert p.returncode == 1 and "different configuration" in p.stderr, p.stderr[-2000:]
    # The unchanged corpus is still reused.
    p = run_study(out, ref["corpus"])
    assert p.returncode == 0 and "reusing" in p.stderr, p.stderr[-2000:]
    assert read(os.path.join(out, "results.json")) == ref["results"]


def test_second_study_in_the_same_directory_is_refused(ref):
    out = os.path.join(ref["tmp"], "locked")
    os.mkdir(out)
    with open(os.path.join(out, ".ropekit.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{os.getpid()}\n")
        f.flush()
        p = run_study(out, ref["corpus"])
        assert p.returncode == 1 and out in p.stderr and f"pid {os.getpid()}" in p.stderr
    assert not os.path.exists(os.path.join(out, "runs"))
