#!/usr/bin/env bash
# Installs the pinned JavaScript clients (package-lock.json) and runs their tests against a
# `ropekit serve` started by the tests. Needs ROPEKIT_CLI (ctest sets it).
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
node --test --test-concurrency=1 clients.test.mjs
