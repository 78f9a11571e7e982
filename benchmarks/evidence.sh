#!/usr/bin/env bash
# docs/evidence.md in one command: label efficiency and the ablations with their defaults, as two 1-thread
# processes on a 2-core machine (about 2.9 hours, docs/evidence.md "Budget"), then one merged report.
#
#   bash benchmarks/evidence.sh [OUT]          # default OUT: runs/evidence
#
# process 1: pretrain the three encoders (20 CPU-minutes each), label efficiency at 1% (seeds 0, 1) and 10%;
# process 2: every ablation sweep, then label efficiency at 1% (seed 2) and 100% on process 1's encoders.
# Both resume where they stopped (--resume / --reuse): run the same command again after an interruption.
# Writes OUT/label_efficiency/label_efficiency.{json,md,png} and OUT/ablations/ablations.{json,md} + figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/evidence}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
MODELS=(mae_vit_tiny_patch4_32 cae_vit_tiny_patch4_32 convmae_tiny_patch8_64)
mkdir -p "$OUT"

first() {
  "$PY" benchmarks/label_efficiency.py --threads 1 --fractions 0.01 0.1 --seeds 0 1 --seeds-at 0.1:1 \
    --resume --out "$OUT/le_1" > "$OUT/le_1.log" 2>&1
}

second() {
  "$PY" benchmarks/ablations.py --threads 1 --tokenizer-steps 1000 --reuse --out "$OUT/ablations" \
    > "$OUT/ablations.log" 2>&1
  local checkpoints=() name
  for name in "${MODELS[@]}"; do  # process 1 writes facts.json once an encoder's pretraining is done
    until [ -e "$OUT/le_1/pretrain/$name/facts.json" ]; do
      kill -0 "$p1" 2>/dev/null || { echo "[evidence] process 1 stopped before $name was pretrained"; return 1; }
      sleep 30
    done
    checkpoints+=("$name=$OUT/le_1/pretrain/$name/checkpoint.pt")
  done
  "$PY" benchmarks/label_efficiency.py --threads 1 --checkpoints "${checkpoints[@]}" --fractions 0.01 1.0 \
    --seeds 2 --resume --out "$OUT/le_2" > "$OUT/le_2.log" 2>&1
}

echo "[evidence] two processes; logs: $OUT/le_1.log, $OUT/ablations.log, $OUT/le_2.log"
first & p1=$!
second & p2=$!
status=0
wait "$p1" || { status=$?; echo "[evidence] label efficiency (process 1) failed: see $OUT/le_1.log"; }
wait "$p2" || { status=$?; echo "[evidence] ablations / label efficiency (process 2) failed: see $OUT/ablations.log, $OUT/le_2.log"; }
[ "$status" = 0 ] || exit "$status"
"$PY" benchmarks/label_efficiency.py --merge "$OUT/le_1/label_efficiency.json" "$OUT/le_2/label_efficiency.json" \
  --out "$OUT/label_efficiency"
echo "[evidence] done: $OUT/label_efficiency/label_efficiency.md, $OUT/ablations/ablations.md"
