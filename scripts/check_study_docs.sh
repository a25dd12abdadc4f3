#!/usr/bin/env bash
# Reruns the quick study preset from scratch (about 10 minutes on 2 cores) and checks that its
# tables equal the ones in docs/study.md, which tests/python/test_study_docs.py checks against
# the committed docs/results/quick/. Training is deterministic for a given CPU and SIMD target;
# another target can change the last printed digit, which this script then reports.
#   scripts/check_study_docs.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cli=${1:-build/release}/tools/ropekit
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$cli" study --preset quick --threads "$(nproc)" --out "$out" --quiet >/dev/null
"$cli" study --report-only --markdown --out "$out" >"$out/fresh.md"
/usr/bin/python3 - "$out/fresh.md" <<'PY'
import re, sys
fresh = open(sys.argv[1]).read().strip()
doc = open("docs/study.md").read()
block = re.search(r"<!-- study-tables quick -->\n(.*?)<!-- end study-tables -->", doc, re.S)
if block is None or block.group(1).strip() != fresh:
    print("docs/study.md: the quick preset's tables differ from a fresh run:\n" + fresh)
    sys.exit(1)
print("docs/study.md: the quick preset's tables match a fresh run")
PY
