#!/usr/bin/env bash
# Patch sorting on full Fashion-MNIST with and without edge masking: a short pretraining each,
# then the held-out sorting accuracy before and after the K steps (from restoration.json).
set -euo pipefail
OUT=${OUT:-runs/sorting}
DATA=${DATA:-fashion-mnist}
STEPS=${STEPS:-400}
for edge in true false; do
  energyssl pretrain --data "$DATA" --task sorting --set "corruption.sorting.edge_mask=$edge" \
    --epochs 1 --warmup-epochs 0.1 --max-steps "$STEPS" --no-tensorboard --out "$OUT/edge-$edge" > "$OUT-edge-$edge.log" 2>&1 || { cat "$OUT-edge-$edge.log"; exit 1; }
  python -c "import json,sys; r=json.load(open('$OUT/edge-$edge/restoration.json'))['tasks']['sorting']; print('edge_mask=$edge', r)"
done
