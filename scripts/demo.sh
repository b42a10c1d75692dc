#!/usr/bin/env bash
# The demo, from a fresh clone: install what it needs into .venv, then run the whole job on generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/edgeq demo --workdir "${EDGEQ_DEMO_DIR:-edgeq-demo}" "$@"
