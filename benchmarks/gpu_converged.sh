#!/usr/bin/env bash
# The converged long-tailed table (issue 14) on a lent GPU, within a time budget: every
# (method, seed) is one benchmarks/imbalanced.py run; PARALLEL of them share the GPU at a time
# (a half-width resnet10t on 28x28 images leaves most of an H100 idle), all appending to one
# runs.csv under OUT. Runs still going at the deadline are stopped and lost; the others are
# kept, and a rerun with the same settings skips them (--resume).
#
#   OUT=$OUT bash benchmarks/gpu_converged.sh                          # on the device machine
#   QUICK=1 DEVICE=cpu METHODS="ce ros" OUT=/tmp/g bash benchmarks/gpu_converged.sh   # dry run
#
# Settings (environment): DEVICE (cuda), EPOCHS (60), SEEDS ("0 1 2"), PARALLEL (6),
# MINUTES (8: the budget for the whole table), METHODS (all, headline rows first),
# GENERATOR (the long-tailed DKGM checkpoint), RHO (100), OUT (runs/gpu_converged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}

DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-60}
SEEDS=${SEEDS:-"0 1 2"}
PARALLEL=${PARALLEL:-6}
MINUTES=${MINUTES:-8}
RHO=${RHO:-100}
OUT=${OUT:-runs/gpu_converged}
GENERATOR=${GENERATOR:-benchmarks/results/imbalanced_fmnist_rho100/fmnist-lt100-tiny.safetensors}
METHODS=${METHODS:-"ros balanced_softmax ldam_drw dkgm_balanced ros_dkgm loss_dkgm dkgm_deferred ce cb_loss drw \
mixup mixup_drw smote randaug dkgm_augment evae_balanced kss_balanced"}
if [ -n "${QUICK:-}" ]; then
    COMMON=(--quick --epochs 1 --device "$DEVICE" --out "$OUT" --resume)
else
    COMMON=(--data fashion-mnist --rho "$RHO" --epochs "$EPOCHS" --batch 128 --channels 32 64 128 256
            --val-fraction 0.1 --generator "$GENERATOR" --device "$DEVICE" --threads 2 --out "$OUT" --resume)
fi
mkdir -p "$OUT"
: > "$OUT/jobs.txt"
for seed in $SEEDS; do
    for m in $METHODS; do
        echo "$PY benchmarks/imbalanced.py ${COMMON[*]} --methods $m --seeds $seed" >> "$OUT/jobs.txt"
    done
done
timeout --signal=TERM "$((MINUTES * 60))" \
    xargs -P "$PARALLEL" -I{} sh -c '{} >> "$0/jobs.log" 2>&1 || true' "$OUT" < "$OUT/jobs.txt" || true
# the report, from every row that finished
"$PY" benchmarks/imbalanced.py "${COMMON[@]}" --methods $METHODS --seeds $SEEDS --report-only
