#!/usr/bin/env bash
# Set up, then pretrain the default small ViT on the embedded Fashion-MNIST subset (~2 minutes
# on 2 CPU cores) and print how well it restores corrupted held-out images.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
energyssl pretrain --epochs 5 --out "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
