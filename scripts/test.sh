#!/usr/bin/env bash
# Set up, then run the linter and the test suite: one pytest worker per core, one thread each (most
# tests are small operations and process start-ups, which threads do not share).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check src tests
OMP_NUM_THREADS=1 python -m pytest -q -n auto
