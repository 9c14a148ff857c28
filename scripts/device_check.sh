#!/usr/bin/env bash
# One prepared call on a GPU machine (one H100 or H200) that checks correctness first, then speed,
# within a 10-minute command: each case runs under its own time limit and writes its JSON (and log)
# under $OUT as soon as it ends, so a call cut short keeps what finished.
#   environment: versions, the GPU, and a stop at once if a module moco needs is missing;
#   correctness (scripts/device_check.py): a short real run on the GPU killed and resumed; one fp16
#     GradScaler step of every method, finite; split BN equal for NCHW and channels_last; the
#     streamed InfoNCE under bf16 against cross-entropy; host reads of every method's step and the
#     host-to-device copies of 10 steps; a Mask R-CNN and an FCN transfer row on the GPU (needs
#     pycocotools for the detection row);
#   speed (moco bench, bf16, channels_last, synthetic views unless said):
#     ResNet-18 CIFAR batch 512 at K 4,096 and 65,536 (targets: >= 20,000 pairs/s, K ratio <= 1.05);
#     ResNet-50 224 (target: >= 1,200 img/s for the MoCo step), both split-BN layouts;
#     the data case on generated JPEGs with 8 and 14 workers; ViT-S/16 with MoCo v3;
#     the real loop on Fashion-MNIST copied to .device/fashion-mnist (git ignores it; carry it),
#     target >= 0.9x the step.
#   Then the figures against their targets, in one table (summary.txt).
# Uses the machine's python3 and torch (PYTHONPATH=src, nothing installed). DEVICE_CHECK_SMOKE=1 runs
# the same plan on the CPU with tiny sizes; the test suite runs it so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src

if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SMOKE=(--smoke); ON=(train.device=cpu train.precision=fp32 train.channels_last=false "model.widths=[8,16,16,16]")
  STEPS=(--steps 1 --repeats 1 --warmup 0); JPEGS=32; JPEG_SIDE=64; WORKERS=(1); R50=(model.arch=resnet18 data.image_size=32 model.bn_splits=2)
else
  DEVICE=cuda; SMOKE=(); ON=(train.device=cuda train.precision=bf16 train.channels_last=true)
  STEPS=(--steps 10 --repeats 8 --warmup 5); JPEGS=4000; JPEG_SIDE=400; WORKERS=(8 14); R50=()
fi
batch() { if [ "$DEVICE" = cpu ]; then echo 8; else echo "$1"; fi; }

bench() {  # NAME TIMEOUT_S CONFIG [overrides and flags]
  local name=$1 limit=$2; shift 2
  echo "== $name: moco bench $*"
  timeout -k 15 "$limit" "$PY" -m moco bench "$@" "${STEPS[@]}" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  echo "   exit $? ($(date +%T))"; grep -E "img/s|^ratio" "$OUT/$name.log" | sed 's/^/   /'
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"
missing=$("$PY" -c "import importlib.util as u; print(' '.join(n for n in ('numpy', 'yaml', 'tqdm', 'matplotlib', 'PIL', 'sklearn') if not u.find_spec(n)))")
if [ -n "$missing" ]; then echo "missing modules: $missing; stopping (pip install them first)" | tee -a "$OUT/machine.txt"; exit 2; fi

timeout -k 15 300 "$PY" scripts/device_check.py "$OUT" "$DEVICE" "${SMOKE[@]}" 2>&1 | tee "$OUT/correctness.log"

bench resnet18_cifar 80 cifar10_v2 "${ON[@]}" optim.batch_size="$(batch 512)" --cases encoder,moco --queue-sizes 4096 65536
bench resnet50_224 90 imagenet_r50_v2 "${ON[@]}" "${R50[@]}" optim.batch_size="$(batch 256)" --cases encoder,moco --queue-sizes 65536
bench resnet50_224_nchw 60 imagenet_r50_v2 "${ON[@]}" "${R50[@]}" train.channels_last=false optim.batch_size="$(batch 256)" \
  --cases moco --queue-sizes 65536
"$PY" - "$OUT/jpegs" "$JPEGS" "$JPEG_SIDE" <<'PY'
import sys, numpy as np
from pathlib import Path
from PIL import Image
root, count, side = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
for i in range(count):
    folder = root / f"class{i % 10}"; folder.mkdir(parents=True, exist_ok=True)
    if not (folder / f"{i:05d}.jpg").exists():
        Image.fromarray(rng.integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
PY
for w in "${WORKERS[@]}"; do
  bench "jpeg_data_w$w" 60 imagenet_r50_v2 "${ON[@]}" "${R50[@]}" data.root="$OUT/jpegs" data.workers="$w" data.val_size=0 \
    data.in_memory_mb=0 optim.batch_size="$(batch 256)" model.K="$(batch 256)" --cases data
done
bench vit_small_224 80 imagenet_r50_v2 "${ON[@]}" model.method=moco_v3 model.arch=vit_small model.patch_size=16 \
  optim.optimizer=adamw optim.lr=1.5e-4 optim.batch_size="$(batch 256)" \
  $([ "$DEVICE" = cpu ] && echo "data.image_size=32 moco_v3.mlp_dim=64") --cases encoder,moco_v3
if [ -f .device/fashion-mnist/train-images-idx3-ubyte.gz ] || [ "$DEVICE" = cpu ]; then
  FMNIST=$([ -f .device/fashion-mnist/train-images-idx3-ubyte.gz ] && echo .device/fashion-mnist || echo "$OUT/folder")
  DATASET=$([ "$FMNIST" = .device/fashion-mnist ] && echo "data.dataset=fashion_mnist" || echo "data.dataset=folder data.channels=3 data.val_size=0 model.K=64")
  # shellcheck disable=SC2086
  bench fmnist_loop 80 fmnist_v2 "${ON[@]}" data.root="$FMNIST" $DATASET optim.batch_size="$(batch 512)" \
    --cases moco,loop --queue-sizes "$([ "$DEVICE" = cpu ] && echo 64 || echo 4096)"
else
  echo "== fmnist_loop: skipped (no .device/fashion-mnist; copy /usr/share/datasets/fashion-mnist there and carry it)"
fi

"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
def rate(name, case, K=None):
    found = load(name)
    for r in (found or {}).get("results", []):
        if r["case"] == case and (K is None or r.get("K") == K) and r.get("img_s"):
            return r["img_s"]
    return None
rows = []
for check in ("resume", "methods", "split_bn_layouts", "streamed_infonce_bf16", "host_reads"):
    found = load(check)
    rows.append((check, "ok" if found and found["ok"] else "FAILED" if found else "not run", ""))
small, large = rate("resnet18_cifar", "moco", 4096), rate("resnet18_cifar", "moco", 65536)
rows.append(("ResNet-18 CIFAR pairs/s, K 4,096", f"{small:.0f}" if small else "-", ">= 20,000"))
rows.append(("K ratio 4,096 / 65,536", f"{small / large:.3f}" if small and large else "-", "<= 1.05"))
r50, nchw = rate("resnet50_224", "moco", 65536), rate("resnet50_224_nchw", "moco", 65536)
rows.append(("ResNet-50 224 MoCo step img/s (channels_last)", f"{r50:.0f}" if r50 else "-", ">= 1,200"))
rows.append(("ResNet-50 224 MoCo step img/s (NCHW)", f"{nchw:.0f}" if nchw else "-", "split BN layouts"))
for path in sorted(out.glob("jpeg_data_w*.json")):
    value = rate(path.stem, "data")
    rows.append((f"JPEG data img/s, {path.stem.split('_w')[-1]} workers", f"{value:.0f}" if value else "-", ""))
vit = rate("vit_small_224", "moco_v3")
rows.append(("ViT-S/16 MoCo v3 step img/s", f"{vit:.0f}" if vit else "-", ""))
step, loop = rate("fmnist_loop", "moco"), rate("fmnist_loop", "loop")
rows.append(("real loop / step", f"{loop / step:.2f}" if step and loop else "-", ">= 0.9"))
for row in rows:
    print(f"{row[0]:48s} {row[1]:>10s}  {row[2]}")
PY
echo "done $(date +%T); results in $OUT"
