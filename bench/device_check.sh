#!/usr/bin/env bash
# One prepared check for a GPU machine (written for 1x H200, 16 cores): rank speed on CUDA (ResNet-56 CIFAR,
# ResNet-50 at 224x224), training throughput, latency, and the rank/train tests with CUDA visible.
#
#   bash bench/device_check.sh                    # on the GPU machine, from the repository root; output in $OUT
#   DEVICE=cpu QUICK=1 OUT=/tmp/dc bash bench/device_check.sh   # local dry run: tiny sizes, CPU, same steps
#
# Every step runs under `timeout` with an explicit limit, writes $OUT/<step>.txt, and appends its exit code
# and duration to $OUT/summary.txt; a failing step does not stop the others. The whole script keeps to
# TOTAL seconds (default 470): a step whose limit no longer fits gets the time left, none once under 15 s.
# Real CIFAR-10 and the ResNet-56 checkpoint are used when shared/data is found at ./shared or ../shared;
# otherwise the rank benchmarks use random images and random weights (said in their first output line).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check_out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
TOTAL=${TOTAL:-470}
PY=${PYTHON:-python}
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # hrank from this tree even if the install fails

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: run CMD under timeout, output to $OUT/NAME.txt
step() {
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$(( TOTAL - ($(date +%s) - START) ))
    if (( left < 15 )); then say "== $name: SKIPPED (only ${left} s of the ${TOTAL} s budget left)"; return; fi
    (( limit > left )) && limit=$left
    say "== $name (timeout ${limit} s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    say "   rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)') in $(( $(date +%s) - t0 )) s"
    tail -n 4 "$OUT/$name.txt" | sed 's/^/   | /' | tee -a "$SUMMARY" > /dev/null
}

# --- 0. environment ---------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  nproc: $(nproc)"
    grep -m1 "model name" /proc/cpuinfo || true
    free -g | head -2 || true
    (command -v nvidia-smi > /dev/null && timeout 30 nvidia-smi) || echo "nvidia-smi: not available"
    echo "python: $($PY --version 2>&1) at $(command -v "$PY")"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
} > "$OUT/env.txt" 2>&1
if ! timeout 60 "$PY" -c "import torch" >> "$OUT/env.txt" 2>&1; then
    step install_torch 180 "$PY" -m pip install torch==2.13.0
fi
timeout 60 "$PY" -c "import torch
print('torch', torch.__version__, 'built with CUDA', torch.version.cuda, 'torch.cuda.is_available()', torch.cuda.is_available())
print('threads', torch.get_num_threads())
for i in range(torch.cuda.device_count()):
    print('gpu', i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**20, 'MiB')
" >> "$OUT/env.txt" 2>&1
if ! "$PY" -c "import hrank" > /dev/null 2>&1 || ! "$PY" -c "import pytest" > /dev/null 2>&1; then
    step install_hrank 150 "$PY" -m pip install -e ".[dev]"
fi
cat "$OUT/env.txt" | tee -a "$SUMMARY"
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "WARNING: torch.cuda.is_available() is False: the CUDA steps below will fail (set DEVICE=cpu to run on CPU)"
fi

# real data: ../shared/data (or ./shared/data) here; on a device machine a reduced copy carried as .devdata/
# (cifar10/cifar-10-batches-py + weights/), since ../shared does not travel with the working tree
DATA=""
for d in shared/data ../shared/data .devdata; do [[ -d $d/cifar10/cifar-10-batches-py ]] && { DATA=$d; break; }; done
DATA_ARGS=(--random-images)
if [[ -n $DATA ]]; then
    DATA_ARGS=(--data-dir "$DATA/cifar10")
    export HRANK_CIFAR10="$DATA/cifar10"
    [[ -d $DATA/weights ]] && export HRANK_WEIGHTS="$DATA/weights"
    say "real data: $DATA/cifar10"
else
    say "no data found at ./shared/data, ../shared/data or .devdata: rank benchmarks on random images (and random weights)"
fi

# --- sizes -------------------------------------------------------------------------------------------
if [[ $QUICK == 1 ]]; then
    R50=(--model resnet_50 --size 64 --images 4 --batch-size 4 --official-images 1 --skip-floor)
    R56=(--model resnet_56 --images 16 --batch-size 16 --official-images 2)
    TRAIN=(--steps 1 --data-steps 2 --repeats 1 --warmup 1 --workers 0 --images 512)
    LAT=(--batches 2 --repeats 1 --warmup 1)
    TESTS=(tests/test_ranks.py -k "matrix_ranks or equals_the_definition")
else
    # official side on a subset (per-map .item() syncs: ~22,700 maps per 224x224 ResNet-50 image, 2,032 per ResNet-56 one)
    R50=(--model resnet_50 --size 224 --images 64 --batch-size 64 --official-images 4 --skip-floor)
    R56=(--model resnet_56 --images 500 --batch-size 128 --official-images 32)
    TRAIN=(--steps 20 --data-steps 100 --repeats 3 --workers 0 4)
    LAT=(--batches 1 128 --repeats 11)
    TESTS=(tests/test_ranks.py tests/test_train.py)
fi
LAT_DEV=(--devices "$DEVICE")
[[ -n $DATA && -f $DATA/weights/resnet56-4bfd9763.th ]] && LAT+=(--checkpoint "$DATA/weights/resnet56-4bfd9763.th")

# --- 1. rank speed: ResNet-50 at 224, then ResNet-56 CIFAR ----------------------------------------------
step rank_speed_resnet50_224 150 "$PY" -u bench/rank_speed.py --device "$DEVICE" "${R50[@]}" "${DATA_ARGS[@]}" \
    --json "$OUT/rank_speed_resnet50_224.json"
step rank_speed_resnet56 110 "$PY" -u bench/rank_speed.py --device "$DEVICE" "${R56[@]}" "${DATA_ARGS[@]}" \
    --json "$OUT/rank_speed_resnet56.json"
# --- 2. tests with CUDA visible ----------------------------------------------------------------------
step pytest_ranks_train 150 "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
# --- 3. training throughput and latency on the device ------------------------------------------------
step train_speed 90 "$PY" -u bench/train_speed.py --device "$DEVICE" "${TRAIN[@]}"
step latency 60 "$PY" -u bench/latency.py "${LAT_DEV[@]}" "${LAT[@]}"

# --- 4. the whole pipeline on the device (hrank run quick: ranks, budget, prune, bf16 fine-tune, export) ----
if [[ -n $DATA && -f $DATA/weights/resnet56-4bfd9763.th ]]; then
    RUN=(--val-size 1000 --train-subset 5000 --test-subset 2000)
    [[ $QUICK == 1 ]] && RUN=(--val-size 200 --train-subset 512 --test-subset 200 --rank-images 32 --finetune epochs=1)
    rm -rf "$OUT/run_quick_dir"
    step run_quick 120 "$PY" -m hrank run quick --data-dir "$DATA/cifar10" --no-download --normalization imagenet \
        --checkpoint "$DATA/weights/resnet56-4bfd9763.th" --device "$DEVICE" --no-progress "${RUN[@]}" \
        --out "$OUT/run_quick_dir"
    cp "$OUT/run_quick_dir/report.md" "$OUT/run_quick_report.md" 2>/dev/null
    rm -rf "$OUT/run_quick_dir"
fi

say "total $(( $(date +%s) - START )) s; outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
# a device machine returns at most 8 files: everything also goes back as one archive
tar czf /tmp/device_check.tgz -C "$OUT" . 2>/dev/null && mv /tmp/device_check.tgz "$OUT/" || true
