#!/usr/bin/env bash
# Full Fashion-MNIST: a brief pretraining of the default small ViT, probes of it and of a random
# init, and fine-tunes from scratch and from the checkpoint. Needs Debian's dataset-fashion-mnist
# (or fashion-mnist:DIR in DATA). Runs one job at a time (two torch jobs on 2 cores starve each other).
# Writes runs under OUT and a Markdown table OUT/results.md.
set -euo pipefail
OUT=${OUT:-runs/fmnist-eval}
DATA=${DATA:-fashion-mnist}
PRE_EPOCHS=${PRE_EPOCHS:-2}
FT_EPOCHS=${FT_EPOCHS:-5}
mkdir -p "$OUT"
t() { local name=$1; shift; local s=$(date +%s); "$@" > "$OUT/$name.log" 2>&1; echo "$name: $(( $(date +%s) - s )) s" | tee -a "$OUT/times.txt"; }

t pretrain energyssl pretrain --data "$DATA" --epochs "$PRE_EPOCHS" --out "$OUT/pretrain" --no-tensorboard
for protocol in linear knn mlp attentive; do
  t "probe-$protocol" energyssl probe --data "$DATA" --protocol "$protocol" --init "$OUT/pretrain" --out "$OUT/probe-$protocol"
done
for protocol in linear knn; do
  t "probe-$protocol-random" energyssl probe --data "$DATA" --protocol "$protocol" --init none --out "$OUT/probe-$protocol-random"
done
t finetune-scratch energyssl finetune --data "$DATA" --init none --epochs "$FT_EPOCHS" --out "$OUT/finetune-scratch" --no-tensorboard
for frac in 0.1; do
  t "finetune-scratch-$frac" energyssl finetune --data "$DATA" --init none --label-fraction $frac --epochs 20 --out "$OUT/finetune-scratch-$frac" --no-tensorboard
  t "finetune-energy-$frac" energyssl finetune --data "$DATA" --init "$OUT/pretrain" --label-fraction $frac --epochs 20 --out "$OUT/finetune-energy-$frac" --no-tensorboard
done
energyssl report "$OUT" --out "$OUT/results.md"
