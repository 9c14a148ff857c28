#!/usr/bin/env bash
# The GPU figures that issues 22 and 23 ask for, in one call on a lent GPU machine (one H100 or H200).
# Each case runs under its own limit (420 s in all, plus about 15 s to kill a case that ignores the
# first signal), inside the device tool's 10 minutes a command; a short plan, as device time is scarce:
#   ResNet-18 (CIFAR stem, 3x32x32) and ResNet-50 (3x224x224): raw encoder work and a MoCo step at
#   K = 4,096 and 65,536, synthetic views, bf16 autocast, channels_last;
#   ViT-S/16 at 224 with MoCo v3 (AdamW): raw encoder and v3 step;
#   the real loop with augmentation on the GPU, on Fashion-MNIST copied into .device/fashion-mnist
#   (the device machine has no dataset and no internet: carry that folder, which git ignores).
# Uses the machine's own python3 and torch (PYTHONPATH=src, nothing installed). Writes each case's
# JSON and log under $OUT (default /tmp/device_check). DEVICE_CHECK_SMOKE=1 runs the same plan on the
# CPU with tiny batches and steps, to check the commands before spending device time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src

if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
  ON=(train.device=cpu train.precision=fp32); SMALL=1; STEPS=(--steps 1 --repeats 1 --warmup 1)
else
  ON=(train.device=cuda train.precision=bf16 train.channels_last=true); SMALL=0; STEPS=(--steps 10 --repeats 8 --warmup 5)
fi
batch() { if [ "$SMALL" = 1 ]; then echo 8; else echo "$1"; fi; }

bench() {  # NAME TIMEOUT_S CONFIG [overrides and flags]
  local name=$1 limit=$2; shift 2
  echo "== $name: moco bench $*"
  timeout -k 15 "$limit" "$PY" -m moco bench "$@" "${STEPS[@]}" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "   exit $? ($(date +%T))"; grep -E "img/s|^ratio" "$OUT/$name.log" | sed 's/^/   /'
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import importlib.util as u; m = [n for n in ('numpy', 'yaml', 'tqdm', 'matplotlib', 'tensorboard', 'PIL', 'sklearn', 'timm') if not u.find_spec(n)]; print('missing modules:', m or 'none')"
} 2>&1 | tee "$OUT/machine.txt"

bench resnet18_cifar 100 cifar10_v2 "${ON[@]}" optim.batch_size="$(batch 512)" --cases encoder,moco --queue-sizes 4096 65536
bench resnet50_224 130 imagenet_r50_v2 "${ON[@]}" optim.batch_size="$(batch 256)" --cases encoder,moco --queue-sizes 4096 65536
bench vit_small_224 100 imagenet_r50_v2 "${ON[@]}" model.method=moco_v3 model.arch=vit_small model.patch_size=16 \
  optim.optimizer=adamw optim.lr=1.5e-4 optim.batch_size="$(batch 256)" --cases encoder,moco_v3
if [ -f .device/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  bench fmnist_loop 90 fmnist_v2 "${ON[@]}" data.root=.device/fashion-mnist optim.batch_size="$(batch 512)" \
    --cases encoder,moco,data,loop --queue-sizes 4096
else
  echo "== fmnist_loop: skipped (no .device/fashion-mnist; copy /usr/share/datasets/fashion-mnist there and carry it)"
fi
echo "done $(date +%T); results in $OUT"
