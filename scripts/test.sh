#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest, e.g. `-m slow` for slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check -q src tests benchmarks
.venv/bin/python -m mypy src/mimkit
.venv/bin/python -m pytest -q "$@"
