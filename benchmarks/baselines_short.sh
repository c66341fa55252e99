#!/usr/bin/env bash
# Short equal-wall-clock comparison on full Fashion-MNIST: each method pretrains the default ViT
# for about the same CPU time (steps set from benchmarks/results/step_cost.md, ~2.5 min each),
# then every encoder and a random init fine-tune with 10% of the labels for 10 epochs.
# One job at a time. Writes OUT/results.md.
set -euo pipefail
OUT=${OUT:-runs/baselines-short}
DATA=${DATA:-fashion-mnist}
mkdir -p "$OUT"
# method:steps:epochs (epochs so that the cosine schedule spans the steps)
for spec in energy:455:1 mae:2200:3 ae:1250:2 cae:1215:2; do
  IFS=: read -r method steps epochs <<< "$spec"
  s=$(date +%s)
  energyssl pretrain --data "$DATA" --method "$method" --task mixed --epochs "$epochs" --max-steps "$steps" \
    --warmup-epochs 0.1 --no-tensorboard --out "$OUT/pre-$method" > "$OUT/pre-$method.log" 2>&1
  echo "pretrain $method: $steps steps, $(( $(date +%s) - s )) s" | tee -a "$OUT/times.txt"
done
for init in energy mae ae cae none; do
  src=$([ "$init" = none ] && echo none || echo "$OUT/pre-$init")
  s=$(date +%s)
  energyssl finetune --data "$DATA" --init "$src" --label-fraction 0.1 --epochs 10 --no-tensorboard \
    --out "$OUT/ft-$init" > "$OUT/ft-$init.log" 2>&1
  echo "finetune $init: $(( $(date +%s) - s )) s" | tee -a "$OUT/times.txt"
done
energyssl report "$OUT" --out "$OUT/results.md"
