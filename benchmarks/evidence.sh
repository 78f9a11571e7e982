#!/usr/bin/env bash
# docs/evidence.md in one command: label efficiency and the ablations with their defaults, as two 1-thread
# processes on a 2-core machine (about 3 hours, docs/evidence.md "Budget"), then one merged report.
#
#   bash benchmarks/evidence.sh [OUT]          # default OUT: runs/evidence
#
# process 1: pretrain the three encoders (20 CPU-minutes each), label efficiency at 1% (3 seeds) and 10%
#            (1 seed; random-init fine-tuning at 1% only);
# process 2: the ablation sweeps, then label efficiency at 100% (1 seed) on process 1's encoders.
# Measured pieces (2026-12-06, Intel Xeon with AMX, CPU-minutes): process 1 about 60 + 3 x 27 + 31 + 3 = 175,
# process 2 about 107 + 50 = 157.
# Both resume where they stopped (--resume / --reuse): run the same command again after an interruption.
# Writes OUT/label_efficiency/label_efficiency.{json,md,png} and OUT/ablations/ablations.{json,md} + figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/evidence}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
MODELS=(mae_vit_tiny_patch4_32 cae_vit_tiny_patch4_32 convmae_tiny_patch8_64)
# the papers' sweeps (cae_masking, not a paper table, is left out for time: --sweeps cae_masking runs it)
SWEEPS=(mae_mask_ratio mae_norm_pix mae_decoder_depth mae_masking cae_alignment cae_regressor cae_target
        convmae_masked_conv convmae_fusion mae_partial_ft feature_recipes)
mkdir -p "$OUT"

first() {
  "$PY" benchmarks/label_efficiency.py --threads 1 --fractions 0.01 0.1 --random-init-up-to 0.01 \
    --resume --out "$OUT/le_1" > "$OUT/le_1.log" 2>&1
}

second() {
  "$PY" benchmarks/ablations.py --threads 1 --tokenizer-steps 1000 --reuse --out "$OUT/ablations" \
    --sweeps "${SWEEPS[@]}" > "$OUT/ablations.log" 2>&1
  local checkpoints=() name
  for name in "${MODELS[@]}"; do  # process 1 writes facts.json once an encoder's pretraining is done
    until [ -e "$OUT/le_1/pretrain/$name/facts.json" ]; do
      kill -0 "$p1" 2>/dev/null || { echo "[evidence] process 1 stopped before $name was pretrained"; return 1; }
      sleep 30
    done
    checkpoints+=("$name=$OUT/le_1/pretrain/$name/checkpoint.pt")
  done
  "$PY" benchmarks/label_efficiency.py --threads 1 --checkpoints "${checkpoints[@]}" --fractions 1.0 \
    --resume --out "$OUT/le_2" > "$OUT/le_2.log" 2>&1
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
