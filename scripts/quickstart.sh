#!/usr/bin/env bash
# The main job on a fresh machine: set up, pretrain MAE (tiny ViT) on Fashion-MNIST for a few minutes,
# write a reconstruction picture and the loss curve, then score the encoder with a kNN probe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/quickstart}
.venv/bin/mimkit pretrain --config configs/mae_tiny_fmnist.yaml --output-dir "$RUN" "$@"
.venv/bin/mimkit probe knn --checkpoint "$RUN/checkpoint.pt" --data fashion_mnist --max-train 5000 --max-test 2000 --bf16 --out "$RUN/knn"
echo
echo "Look at: $RUN/reconstructions.png  $RUN/loss_curve.png  $RUN/knn/"
