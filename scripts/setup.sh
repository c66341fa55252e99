#!/usr/bin/env bash
# Create .venv and install the pinned versions CI uses (torch first: it comes from local files here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
pip install -q --disable-pip-version-check -r requirements.lock
pip install -q --disable-pip-version-check --no-deps -e .
