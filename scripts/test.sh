#!/usr/bin/env bash
# The test suite, from a fresh clone: install, then run every test (real TensorFlow, LiteRT, mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest "$@"
