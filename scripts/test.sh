#!/usr/bin/env bash
# The test command: install, lint, type-check, run the whole suite (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --runtimes  # + docker.io, podman, busybox-static
.venv/bin/ruff check src lab/src tests
.venv/bin/mypy src lab/src tests
# Remove what a crashed earlier run may have left (runs still in progress are kept).
.venv/bin/weft testbed down >/dev/null
if (($#)); then
  .venv/bin/pytest -q "$@"
else
  # tests/unit must pass with no capability at all, so it runs without any: a unit test
  # that needs root fails here rather than passing only because the suite runs as root.
  setpriv --inh-caps=-all --bounding-set=-all .venv/bin/pytest -q -p no:cacheprovider tests/unit
  .venv/bin/pytest -q tests/netns
fi
