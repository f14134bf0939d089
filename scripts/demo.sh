#!/usr/bin/env bash
# Install, then run `weft demo` (embedded store, vxlan; pass options through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/weft demo "$@"
