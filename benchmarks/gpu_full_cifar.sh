#!/usr/bin/env bash
# VGG-19 K=8 on the full CIFAR-10 training set on a lent GPU: wall time to accuracy (issue
# "Training at speed and at scale"). A device call carries at most 64 MiB and the 51 PNG batches
# are 114 MiB, so the data comes in two calls made back to back (see benchmarks/README.md):
#   call 1: carry [".stage/cifar10_a"] (PNGs 0-24);              command: bash benchmarks/gpu_full_cifar.sh stage
#   call 2: carry [".stage/cifar10_b"] (PNGs 25-50, the labels); command: bash benchmarks/gpu_full_cifar.sh train
# Both halves are staged here before call 1, so call 2 can follow at once (an idle machine is
# given back after about 30 s, and with it the first half).
# Both copy what they carry to a folder outside the repository; call 2 checks that all 51 batches
# are there and says plainly what is missing (then it trains on what there is, marked partial).
# Records land under $OUT/results with the training curve (accuracy per epoch and seconds).
set -u -o pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 SLOTPACK_RESULTS="$OUT/results"
STAGE="${TMPDIR:-/tmp}/slotpack_cifar_stage"
mkdir -p "$STAGE" "$SLOTPACK_RESULTS"
for d in .stage/cifar10 .stage/cifar10_a .stage/cifar10_b; do  # whichever half was carried
  [ -d "$d" ] && cp "$d"/* "$STAGE"/ && echo "carried: $(ls "$d" | wc -l) files in $d"
done
have=$(ls "$STAGE" | grep -c '^cifar10_batch_.*\.png$')
echo "staged outside the repository: $have of 51 PNG batches, labels: $(ls "$STAGE" | grep -c labels)"
[ "${1:-}" = "stage" ] && exit 0

missing=$(for i in $(seq 0 50); do [ -f "$STAGE/cifar10_batch_$i.png" ] || printf '%s ' "$i"; done)
TAG=_cuda_full
if [ -n "$missing" ]; then
  echo "MISSING PNG batches (the first call's files are gone?): $missing"
  TAG=_cuda_partial
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
python3 -m benchmarks.cifar10_offline --src "$STAGE" --root /tmp/data --allow-partial 2>&1 | tail -3
E="${VGG_EPOCHS:-80}" MODEL="${MODEL:-vgg19}"  # MODEL, LIMIT, DEVICE: for a dry run on CPU
echo "== $(date -u +%T) $MODEL K=8, $E cosine epochs"
python3 -m benchmarks.accuracy --model "$MODEL" --k 8 --epochs "$E" --schedule cosine \
    --root /tmp/data --device "${DEVICE:-cuda}" --runs /tmp/runs --tag "$TAG" \
    ${LIMIT:+--limit "$LIMIT"} 2>&1 | grep -v "step/s" | tail -5
cp /tmp/runs/*/model.slot "$OUT/" 2>/dev/null
echo "== $(date -u +%T) done"
