#!/usr/bin/env bash
# The test suite, from a fresh clone: install into .venv, then run every test (real TensorFlow, LiteRT, mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# two workers (pytest-xdist), each taking whole test files so that module fixtures are built once, the slowest files
# first (tests/conftest.py: SLOW_FIRST; --no-loadscope-reorder keeps that order)
exec .venv/bin/python -m pytest -n "${EDGEQ_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
