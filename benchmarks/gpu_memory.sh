#!/usr/bin/env bash
# Training-step memory and time on a lent GPU (issue "Training at speed and at scale"), run by the
# `device` tool from the repo root; no data needed (random batches). VGG-19 at K=8 and K=64, batch
# 128, float32: the reference approach, slotpack's stored bank, lean, lean + step in backward, and
# lean + step in backward + bfloat16 scores; then the same K=8 rows with bf16 autocast. First,
# the fused Triton kernels against torch ops on one VGG-19 layer (benchmarks/kernel_speed.py).
# Records land under $OUT/results; about 3 minutes on an H100.
set -u -o pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 SLOTPACK_RESULTS="$OUT/results"
DEV="${DEVICE:-cuda}" MODELS="${MODELS:-vgg19}" STEPS="${STEPS:-20}"
mkdir -p "$SLOTPACK_RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: $DEV"
echo "== $(date -u +%T) fused Triton kernels against torch ops (one VGG-19 layer)"
python3 -m benchmarks.kernel_speed --device "$DEV" --name "kernel_speed_${DEV}" 2>&1 | grep -v Warning
IMPLS="reference slotpack lean lean-torch lean+sib lean+sib+bf16 learned"
for K in 8 64; do
  echo "== $(date -u +%T) K=$K float32"
  python3 -m benchmarks.step_time --models $MODELS --k "$K" --impls $IMPLS --device "$DEV" \
      --steps "$STEPS" --warmup 3 --name "step_time_${DEV}_k${K}" 2>&1 | grep -v Warning
done
echo "== $(date -u +%T) K=8 bf16 autocast"
python3 -m benchmarks.step_time --models $MODELS --k 8 --impls $IMPLS --device "$DEV" --amp \
    --steps "$STEPS" --warmup 3 --name "step_time_${DEV}_k8_amp" 2>&1 | grep -v Warning
echo "== $(date -u +%T) done"
