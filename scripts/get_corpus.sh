#!/usr/bin/env bash
# Fetches the Jane Austen corpus of the length-extrapolation protocol: Debian's
# r-cran-janeaustenr package is downloaded (not installed: no R needed) and its six novels are
# extracted as UTF-8 text, one file per novel. Train on the five novels other than Persuasion,
# validate on persuasion.txt.
# Usage: scripts/get_corpus.sh [OUT_DIR]   (default: data/austen)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-data/austen}
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
(cd "${work}" && apt-get download r-cran-janeaustenr >/dev/null)
dpkg-deb -x "${work}"/r-cran-janeaustenr_*.deb "${work}/pkg"
rdb=$(find "${work}/pkg" -name Rdata.rdb -path '*janeaustenr*' | head -n 1)
if [[ -z "${rdb}" ]]; then
  echo "get_corpus.sh: Rdata.rdb not found in r-cran-janeaustenr" >&2
  exit 1
fi
/usr/bin/python3 scripts/extract_janeausten.py "${rdb}" "${out}"
ls -l "${out}"
