#!/usr/bin/env bash
# The demo, from a fresh clone: install, then run the whole job on generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec edgeq demo --workdir "${EDGEQ_DEMO_DIR:-edgeq-demo}" "$@"
