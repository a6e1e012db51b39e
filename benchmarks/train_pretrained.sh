#!/usr/bin/env bash
# Trains the generators shipped in dkgm_aug/pretrained/ with our own command line.
# Each checkpoint records this exact command, its data, steps, wall time and hardware
# in its metadata (`dkgm-aug info fashion-mnist-tiny`). Run from the repo root after `make setup`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-dkgm_aug/pretrained}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT" runs
$PY -m dkgm_aug.cli train --data fashion-mnist --split train --preset tiny \
    --stage1-steps 1200 --stage2-steps 500 --batch-size 64 --save-every 100 --seed 0 \
    --work-dir runs/fashion-mnist-tiny --out "$OUT/fashion-mnist-tiny.safetensors"
$PY -m dkgm_aug.cli train --data digits --split train --preset tiny \
    --stage1-steps 2000 --stage2-steps 600 --batch-size 64 --save-every 200 --seed 0 \
    --work-dir runs/digits-tiny --out "$OUT/digits-tiny.safetensors"
