"""The study tables in the docs are generated from committed results, not typed by hand.

docs/results/<preset>/ holds the results.json, curves.json and study.json of a study run; each
block of docs/study.md between `<!-- study-tables <preset> -->` and `<!-- end study-tables -->`
must equal `ropekit study --report-only --markdown` on those files. scripts/check_study_docs.sh
reruns the quick preset from scratch and compares its tables with the committed ones.
"""

import os
import re
import shutil
import subprocess

import pytest

CLI = os.environ.get("ROPEKIT_CLI")
SRC = os.environ.get("ROPEKIT_SOURCE_DIR")
if not CLI or not SRC:
    raise RuntimeError("ROPEKIT_CLI and ROPEKIT_SOURCE_DIR must be set (ctest sets them)")

BLOCK = re.compile(r"<!-- study-tables (\w+) -->\n(.*?)<!-- end study-tables -->", re.S)


def doc_blocks():
    with open(os.path.join(SRC, "docs", "study.md")) as f:
        return BLOCK.findall(f.read())


def test_docs_hold_generated_tables():
    assert [preset for preset, _ in doc_blocks()] == ["quick"]


@pytest.mark.parametrize("preset,block", doc_blocks())
def test_doc_tables_match_the_committed_results(tmp_path, preset, block):
    results = os.path.join(SRC, "docs", "results", preset)
    for name in ("results.json", "curves.json", "study.json"):
        shutil.copy(os.path.join(results, name), tmp_path / name)
    p = subprocess.run([CLI, "study", "--report-only", "--markdown", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == block.strip()
    assert (tmp_path / "report.html").stat().st_size > 0


def test_markdown_needs_report_only(tmp_path):
    p = subprocess.run([CLI, "study", "--markdown", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "--markdown" in p.stderr
