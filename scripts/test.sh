#!/usr/bin/env bash
# The test command: install, lint, type-check, run the whole suite (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --runtimes  # + docker.io, podman, busybox-static
.venv/bin/ruff check src lab/src tests
.venv/bin/mypy src lab/src tests
# Remove what a crashed earlier run may have left (runs still in progress are kept).
.venv/bin/weft testbed down >/dev/null
.venv/bin/pytest -q "$@"
