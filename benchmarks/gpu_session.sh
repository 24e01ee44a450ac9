#!/usr/bin/env bash
# One lent-GPU session for the foundation issue (run by the `device` tool from the repo root):
# CUDA == numpy generator check, step time against the reference approach, and short CUDA training
# runs on the CIFAR-10 training batches carried in .stage/cifar10 (see benchmarks/README.md).
# Everything it measures lands as JSON records under $OUT/results.
set -u -o pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 SLOTPACK_RESULTS="$OUT/results"
mkdir -p "$SLOTPACK_RESULTS"
log() { echo "== $(date -u +%H:%M:%S) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision, numpy; print(torch.__version__, torchvision.__version__, numpy.__version__)"

log "generator: CUDA == numpy"
python3 -m benchmarks.prng_check --device cuda --count 50000000 2>&1 | tee "$OUT/prng.log"

log "CIFAR-10 staging: $(ls .stage/cifar10 | wc -l) files carried"
python3 -m benchmarks.cifar10_offline --src .stage/cifar10 --root /tmp/data --allow-partial 2>&1 | tail -5

log "step time: slotpack vs reference approach (float32, batch 128)"
python3 -m benchmarks.step_time --models conv6 vgg19 --k 8 --device cuda --steps 30 --warmup 5 \
    --name step_time_cuda 2>&1 | tee "$OUT/step.log"

log "Conv-6 K=8 on the carried CIFAR-10 subset"
python3 -m benchmarks.accuracy --model conv6 --k 8 --epochs "${CONV6_EPOCHS:-40}" --root /tmp/data \
    --device cuda --runs /tmp/runs --tag _cuda_subset 2>&1 | grep -v "step/s" | tail -3

log "VGG-19 K=8 on the carried CIFAR-10 subset"
python3 -m benchmarks.accuracy --model vgg19 --k 8 --epochs "${VGG_EPOCHS:-20}" --schedule cosine \
    --root /tmp/data --device cuda --runs /tmp/runs --tag _cuda_subset 2>&1 | grep -v "step/s" | tail -3
log "done"
ls -la "$SLOTPACK_RESULTS"
