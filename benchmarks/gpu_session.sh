#!/usr/bin/env bash
# Everything a lent GPU is for in issues 11 and 14, in one call within a time budget:
#   1. the long-tailed split's fit part (no validation images) exported as .npz;
#   2. in the background, on the GPU: a generator trained on that split (it goes first: the
#      DKGM rows need it), a larger Fashion-MNIST generator and a digits generator
#      (benchmarks/gpu_generator.py: time-budgeted, calibrated, scored with the evaluator);
#   3. the converged benchmark's non-generative rows, PARALLEL runs at a time sharing the GPU;
#   4. once the long-tailed generator exists, the DKGM rows (dkgm_balanced, ros_dkgm), without
#      and with the label filter;
#   5. at the deadline, whatever is still running is stopped (its row is lost; a rerun with
#      --resume skips the finished ones), the report is rebuilt, and everything is packed into
#      $OUT/session.tar.gz (the device tool brings back at most 8 files).
#
#   OUT=$OUT bash benchmarks/gpu_session.sh                  # on the device machine
#   QUICK=1 DEVICE=cpu OUT=/tmp/gs bash benchmarks/gpu_session.sh   # the CPU dry run (digits, 1 epoch)
#
# The device machine has no Fashion-MNIST: copy /usr/share/datasets/fashion-mnist into .gpu/ (which
# .git/info/exclude ignores) and name .gpu/fashion-mnist in the call's carry; this script then reads
# it from there. The tracked tree and that copy (29 MiB) must stay under the tool's 64 MiB: with
# the tree at 56 MiB, the 2026-11-28 call took the two largest result generators out of the index
# for the call (git rm --cached, then git reset) since no row of the call needed them.
#
# Settings (environment): DEVICE (cuda), MINUTES (7.5: the whole budget), LAUNCH_MINUTES (6: no
# run starts after this), PARALLEL (5 plain rows at a time), DKGM_PARALLEL (3), EPOCHS (30), SEEDS ("0 1 2"), LT1/LT2 (stage budgets
# of the long-tailed generator, minutes), FM1/FM2 (the Fashion-MNIST one's), PRESET (small);
# GENERATOR=path: a second call that runs the DKGM rows with that generator (DKGM_PARALLEL);
# GENERATORS ("lt fm digits", none with GENERATOR: which to train; lt is ignored with GENERATOR),
# CHUNK (200: a generator's steps between time checks), PLAIN_METHODS, DKGM_METHODS (the rows to run),
# BANK (unset: online generation; K: the augmented rows draw from one shared bank of K neighbours),
# CONDITIONAL (unset; 1: the long-tailed generator is class-conditional in both stages),
# DKGM_ALPHA (unset: the generator's calibrated alpha; a value: imbalanced.py --dkgm-alpha),
# LABEL_FILTER (1: each DKGM row without and with the evaluator's label filter; 0: without only),
# RHO (100), PROFILE (exp; or step), CLASS_ORDER (natural; reversed, perm:SEED): the split, for
# which the long-tailed generator is trained on that split's fit part.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7.5}
LAUNCH_MINUTES=${LAUNCH_MINUTES:-6}
PARALLEL=${PARALLEL:-5}
EPOCHS=${EPOCHS:-30}
SEEDS=${SEEDS:-"0 1 2"}
PRESET=${PRESET:-small}
GENERATORS=${GENERATORS-$( [ -n "${GENERATOR:-}" ] || echo "lt fm digits")}
CHUNK=${CHUNK:-200}
PLAIN_METHODS=${PLAIN_METHODS:-"ros balanced_softmax drs ldam_drw ce | cb_loss drw randaug mixup smote mixup_drw"}
DKGM_METHODS=${DKGM_METHODS:-"dkgm_deferred dkgm_balanced ros_dkgm"}
OUT=${OUT:-runs/gpu_session}
RHO=${RHO:-100}
PROFILE=${PROFILE:-exp}
CLASS_ORDER=${CLASS_ORDER:-natural}
LABEL_FILTER=${LABEL_FILTER:-1}
WORK=${WORK:-/tmp/gpu_session}
START=$(date +%s)
seconds() { awk -v m="$1" 'BEGIN { printf "%d", m * 60 }'; }
END=$((START + $(seconds "$MINUTES")))
LAUNCH_END=$((START + $(seconds "$LAUNCH_MINUTES")))
mkdir -p "$OUT" "$WORK"
[ -d /usr/share/datasets/fashion-mnist ] || [ ! -d .gpu/fashion-mnist ] \
    || export DKGM_FASHION_MNIST=${DKGM_FASHION_MNIST:-$PWD/.gpu/fashion-mnist}
# a fresh device machine has no dkgm_aug installed: the rows and generators import this checkout's
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$WORK/session.log"; }
stop() { log "$* : stopping"; cp "$WORK/session.log" "$OUT/session.log"; exit 1; }   # before anything ran
rows() {   # rows FILE: run its lines, PARALLEL at a time; a line not started by LAUNCH_END is skipped
    xargs -P "$PARALLEL" -I{} sh -c '[ "$(date +%s)" -lt "$1" ] && { {} >> "$2/rows.log" 2>&1 || echo "FAILED: {}" >> "$2/rows.log"; }' \
        _ "$LAUNCH_END" "$WORK" < "$1"
}

if [ -n "${QUICK:-}" ]; then
    DATA=digits; GQ=(--quick); LT1=${LT1:-0.01}; LT2=${LT2:-0.01}; FM1=${FM1:-0.01}; FM2=${FM2:-0.01}
    ROWS=(--quick --epochs 1 --device "$DEVICE" --out "$WORK/lt")
    SPLIT=(--quick --epochs 1)
    FM_DATA=digits
else
    DATA=fashion-mnist; GQ=(); LT1=${LT1:-1.5}; LT2=${LT2:-1.0}; FM1=${FM1:-3.0}; FM2=${FM2:-1.5}
    SHAPE=(--rho "$RHO" --profile "$PROFILE" --class-order "$CLASS_ORDER")
    ROWS=(--data fashion-mnist "${SHAPE[@]}" --epochs "$EPOCHS" --batch 128 --channels 32 64 128 256
          --val-fraction 0.1 --device "$DEVICE" --threads 1 --out "$WORK/lt")
    SPLIT=(--data fashion-mnist "${SHAPE[@]}" --epochs "$EPOCHS" --val-fraction 0.1)
    FM_DATA=fashion-mnist
fi
log "device $DEVICE; $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')"
# fail in seconds, not at the deadline, where nothing could run (a lent GPU's minutes are few)
$PY -c "import dkgm_aug, timm" >> "$WORK/session.log" 2>&1 || stop "$PY cannot import dkgm_aug or timm"

SMI_PID=
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$WORK/gpu_util.csv" 2>&1 &
    SMI_PID=$!
fi

gen() {   # gen NAME ARGS...: one gpu_generator.py run, logged
    local name=$1; shift
    $PY benchmarks/gpu_generator.py "${GQ[@]}" --device "$DEVICE" --preset "$PRESET" --chunk "$CHUNK" --out "$WORK/$name" "$@" \
        > "$WORK/$name.log" 2>&1 && log "generator $name done" || log "generator $name FAILED"
}
other_gens() {   # the generators that the rows do not wait for: full Fashion-MNIST, digits
    [[ " $GENERATORS " == *" fm "* ]] && gen fm_gen --data "$FM_DATA" --stage1-minutes "$FM1" --stage2-minutes "$FM2" &
    [[ " $GENERATORS " == *" digits "* ]] && gen digits_gen --data digits --preset tiny --batch-size 256 --stage1-minutes "$LT1" --stage2-minutes "$LT2" &
}

if [ -n "${GENERATOR:-}" ]; then   # a second call: the DKGM rows with a generator made earlier (and GENERATORS, if named)
    LT_PID=; GEN=$GENERATOR
    other_gens
else
# 1. the split the classifiers fit on, and nothing else
$PY benchmarks/imbalanced.py "${SPLIT[@]}" --export-split "$WORK/lt_fit.npz" >> "$WORK/session.log" 2>&1 || stop "the split's export failed"

# 2. generators, in the background
[[ " $GENERATORS " == *" lt "* ]] && gen lt_gen --data "$WORK/lt_fit.npz" --evaluator "$DATA-evaluator" --name "$DATA-lt${RHO}-${PROFILE}-${CLASS_ORDER//:/}-fit-$PRESET" ${CONDITIONAL:+--conditional} \
    --stage1-minutes "$LT1" --stage2-minutes "$LT2" &
LT_PID=$!
other_gens

# 3. + 4. the rows: one imbalanced.py process per (method, knobs, seed), launched until LAUNCH_END
: > "$WORK/plain.txt"
IFS='|' read -ra GROUPS_ <<< "$PLAIN_METHODS"     # groups run seed-major: the first group's seeds first
for group in "${GROUPS_[@]}"; do
    for seed in $SEEDS; do
        for m in $group; do
            echo "$PY benchmarks/imbalanced.py ${ROWS[*]} --resume --methods $m --seeds $seed" >> "$WORK/plain.txt"
        done
    done
done
rows "$WORK/plain.txt" &
fi
dkgm_rows() {   # once the long-tailed generator exists: its rows, without and with the label filter
    GEN=${GENERATOR:-$(ls "$WORK"/lt_gen/*.safetensors 2>/dev/null | head -1)}
    [ -n "$GEN" ] || { log "no long-tailed generator: no DKGM rows"; return; }
    : > "$WORK/dkgm.txt"
    FILTERS=("")
    [ "$LABEL_FILTER" = 1 ] && FILTERS+=("--label-filter $DATA-evaluator")
    for m in $DKGM_METHODS; do     # the deferred and balanced rows first: they generate far fewer images
        for seed in $SEEDS; do
            for filter in "${FILTERS[@]}"; do
                echo "$PY benchmarks/imbalanced.py ${ROWS[*]} --resume --generator $GEN $filter ${BANK:+--bank $BANK} ${DKGM_ALPHA:+--dkgm-alpha $DKGM_ALPHA} --methods $m --seeds $seed" >> "$WORK/dkgm.txt"
            done
        done
    done
    log "DKGM rows start with $GEN"
    PARALLEL=${DKGM_PARALLEL:-3} rows "$WORK/dkgm.txt" &   # 12 at once saturated an H200: none finished in 8.5 min
}

# 5. the deadline (never blocking on a job), the report, the pack
DKGM_STARTED=
while [ "$(date +%s)" -lt "$END" ]; do
    if [ -z "$DKGM_STARTED" ] && { [ -z "$LT_PID" ] || ! kill -0 "$LT_PID" 2>/dev/null; }; then DKGM_STARTED=1; dkgm_rows; fi
    [ -n "$DKGM_STARTED" ] && [ -z "$(jobs -pr | grep -vx "${SMI_PID:-none}")" ] && break   # nvidia-smi runs on
    sleep 5
done
log "deadline or all done; stopping what is left: $(jobs -pr | grep -vx "${SMI_PID:-none}" | wc -l) job(s)"
# only this session's runs: each names an --out under $WORK (other runs on the machine are left alone)
pkill -TERM -f -- "--out $WORK/"; sleep 3; pkill -KILL -f -- "--out $WORK/"
[ -n "$SMI_PID" ] && kill "$SMI_PID"
$PY benchmarks/imbalanced.py "${ROWS[@]}" ${GEN:+--generator "$GEN"} --report-only --seeds $SEEDS > "$WORK/report.log" 2>&1 || log "report failed"
log "rows finished: $(($(wc -l < "$WORK/lt/runs.csv" 2>/dev/null || echo 1) - 1))"
cp "$WORK/session.log" "$OUT/session.log"
# the device tool brings back files of at most 16 MiB: generators come back one file each, beside
# the tarball; the banks (about 100 MB) and the exported split are remade from them here
for g in "$WORK"/*/*.safetensors; do [ -e "$g" ] && cp "$g" "$OUT/"; done
tar -czf "$OUT/session.tar.gz" -C "$WORK" --exclude='work' --exclude='banks' --exclude='*.npz' --exclude='*.safetensors' . \
    && log "packed $(du -h "$OUT/session.tar.gz" | cut -f1); generators: $(ls "$OUT"/*.safetensors 2>/dev/null | wc -l)"
cp "$WORK/session.log" "$OUT/session.log"
