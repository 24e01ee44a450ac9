#!/usr/bin/env bash
# CIFAR-10 accuracy rows on a lent GPU (issue "Benchmarks"), run by the `device` tool from the repo
# root with the CIFAR-10 PNG batches staged in .stage/cifar10 (see benchmarks/README.md).
# Small conv nets leave an H100 mostly idle, so their runs go four at a time; VGG-19 runs last.
# Everything comes back as one bundle ($OUT/bundle.tgz: results/*.json and the .slot files,
# which are evaluated on the 10k hybrid test set here afterwards) plus one log.
set -u -o pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 SLOTPACK_RESULTS=/tmp/bundle/results
DEV="${DEVICE:-cuda}" E="${CONV_EPOCHS:-30}" V="${VGG_EPOCHS:-15}" LIMIT="${LIMIT:+--limit $LIMIT}"
mkdir -p /tmp/bundle/results /tmp/bundle/slots /tmp/logs
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "no GPU: $DEV"
python3 -m benchmarks.cifar10_offline --src .stage/cifar10 --root /tmp/data --allow-partial | tail -3
run() {  # name, then benchmarks.accuracy arguments
  local name=$1; shift
  python3 -m benchmarks.accuracy "$@" --root /tmp/data --device "$DEV" --runs /tmp/runs \
    --tag _cuda_subset $LIMIT > "/tmp/logs/$name.log" 2>&1 || echo "FAILED: $name"
  grep -h "^accuracy_" "/tmp/logs/$name.log"
}
bundle() {  # after every wave, so a run cut short by the time limit still returns its rows
  for d in /tmp/runs/*/; do
    [ -f "$d/model.slot" ] && cp "$d/model.slot" "/tmp/bundle/slots/$(basename "$d").slot"
  done
  tar czf "$OUT/bundle.tgz" -C /tmp/bundle results slots
  cat /tmp/logs/*.log | grep -v "step/s" | tail -c 200000 > "$OUT/logs.txt"
}
echo "== $(date -u +%T) conv nets, five at a time"
run conv2 --model conv2 --k 2 8 --epochs "$E" &
run conv4 --model conv4 --k 2 8 --epochs "$E" &
run conv6k2 --model conv6 --k 2 --epochs "$E" &
run conv6k8 --model conv6 --k 8 --epochs "$E" --finetune "$((E / 2))" &
run conv6p --model conv6 --k 8 --selection probabilistic --epochs "$E" &
wait; bundle
echo "== $(date -u +%T) float32 baselines"
run conv2l --model conv2 --method learned --epochs "$E" &
run conv4l --model conv4 --method learned --epochs "$E" &
run conv6l --model conv6 --method learned --epochs "$E" &
run vgg19l --model vgg19 --method learned --epochs "$V" --schedule cosine &
wait; bundle
echo "== $(date -u +%T) VGG-19 K=8"
run vgg19 --model vgg19 --k 8 --epochs "$V" --schedule cosine
bundle
echo "== $(date -u +%T) done"
ls /tmp/bundle/results /tmp/bundle/slots
