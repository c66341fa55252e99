#!/usr/bin/env bash
# Set up, then run the linter and the test suite (about 6 minutes from a fresh clone on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check src tests
python -m pytest -q
