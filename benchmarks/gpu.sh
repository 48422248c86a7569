#!/usr/bin/env bash
# The README's GPU tables in one command, on one CUDA GPU, in under 8 minutes, everything under one folder:
#
#     benchmarks/gpu.sh [OUT_DIR]          # default benchmarks/results/gpu-<date>
#     PYTHON=.venv/bin/python benchmarks/gpu.sh
#     DEVICE=cpu BATCHES=1 TRAIN_BATCH=1 ITERS=1 INFER_BUDGET=20 TRAIN_BUDGET=10 MAXB_BUDGET=5 benchmarks/gpu.sh /tmp/dry
#                                          # a dry run of the script's plumbing on a CPU machine
#
# Stages, each with a time budget (250 / 110 / 50 s): batch sizes or models not started in time become
# "skipped" rows; a (model, batch) group already started finishes, so the run is sized for < 8 minutes on one
# H200-class GPU with margin for one long group (not yet run on a GPU: no device was available when written):
#   1. infer/   every registered model (families' native-size representatives first), pooled features and
#               full forward, batch 1 / 32 / 256, fp32 / bf16 / fp16 autocast / auto (the fast path), each
#               against its peer (torchgeo DOFA, timm ResNet-50/18, timm Swin-T) in the same process.
#   2. train/   forward + backward + AdamW step, batch 32, fp32 / bf16 / auto, against the peers.
#   3. max_batch/  the fast path at growing batch sizes until out of memory, DOFA-base, ResNet-50, Swin-T and
#               every model of a family added since (all its architectures: the list cannot know which is native).
# TF32 stays OFF (the harness default): "fp32" rows are float32 in both the speed and the fidelity (cosine)
# columns, and their fraction of peak is against the float32 (non-TF32) matmul peak measured in the same run.
# Add --tf32 to a stage to see what TF32 changes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, installed or not
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
DEVICE=${DEVICE:-cuda}
INFER_BUDGET=${INFER_BUDGET:-250}
TRAIN_BUDGET=${TRAIN_BUDGET:-110}
MAXB_BUDGET=${MAXB_BUDGET:-50}
ITERS=${ITERS:-10}
BATCHES=${BATCHES:-1,32,256}
TRAIN_BATCH=${TRAIN_BATCH:-32}
PRECISIONS=fp32,bf16,fp16,auto
[ "$DEVICE" = cpu ] && PRECISIONS=fp32,bf16,auto

if [ "$DEVICE" != cpu ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -m pip freeze > "$OUT/pip-freeze.txt" 2>/dev/null || true

# native-size representatives of each family first, then every other registered model, the DOFA large / huge
# variants last (so a family added later is never queued behind them when a budget runs out)
read -r -a MODELS <<< "$("$PY" - <<'PY'
import eobackbones
first = ['dofa_base', 'dualsimclr_resnet50_s2', 'dualsimclr_resnet18_s2', 'sslswin_tiny_s2', 'dualsimclr_resnet50',
         'sslswin_tiny', 'dofa_small']
names = eobackbones.list_models()
last = [n for n in names if n in ('dofa_large', 'dofa_huge')]
print(' '.join([n for n in first if n in names] + [n for n in names if n not in first and n not in last] + last))
PY
)"
read -r -a REPS <<< "$("$PY" - <<'PY'
import eobackbones
names = eobackbones.list_models()
first = ['dofa_base', 'dualsimclr_resnet50_s2', 'sslswin_tiny_s2']
known = ('dofa_', 'dualsimclr_', 'sslswin_')
print(' '.join([n for n in first if n in names] + [n for n in names if not n.startswith(known)]))
PY
)"
COMMON=(--device "$DEVICE" --compare --warmup 2 --iters "$ITERS" --plot --quiet)

start=$(date +%s)
"$PY" benchmarks/throughput.py "${MODELS[@]}" "${COMMON[@]}" --mode infer --batch-sizes "$BATCHES" \
    --precision "$PRECISIONS" --budget-s "$INFER_BUDGET" --out "$OUT/infer"
"$PY" benchmarks/throughput.py "${MODELS[@]}" "${COMMON[@]}" --mode train --batch-sizes "$TRAIN_BATCH" \
    --precision fp32,bf16,auto --budget-s "$TRAIN_BUDGET" --out "$OUT/train"
"$PY" benchmarks/throughput.py "${REPS[@]}" --device "$DEVICE" \
    --mode infer --batch-sizes auto --max-batch 2048 --precision auto --warmup 2 --iters 5 --plot --quiet \
    --budget-s "$MAXB_BUDGET" --no-peak --out "$OUT/max_batch"
echo "done in $(( $(date +%s) - start )) s: $OUT/{infer,train,max_batch}/bench.{md,json,csv} and *.png" >&2
