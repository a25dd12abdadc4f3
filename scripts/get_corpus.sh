#!/usr/bin/env bash
# Fetches the extrapolation study's corpus: the six Jane Austen novels of Debian's
# r-cran-janeaustenr package (public-domain texts, MIT packaging), extracted without R into
# DATA_DIR/austen/*.txt (default DATA_DIR: data/, git-ignored). `ropekit study` does the same on
# demand; this script only runs that step. Needs a built `ropekit` (ROPEKIT_CLI or
# build/release/tools/ropekit), apt-get and dpkg-deb. Nothing is installed: the package is
# downloaded with `apt-get download` and unpacked with `dpkg-deb -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
cli=${ROPEKIT_CLI:-build/release/tools/ropekit}
if [ ! -x "$cli" ]; then
  echo "get_corpus: $cli not found; build first (cmake --build build/release) or set ROPEKIT_CLI" >&2
  exit 1
fi
exec "$cli" corpus --data-dir "${1:-data}"
