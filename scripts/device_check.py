"""The correctness half of scripts/device_check.sh: each check writes ``OUT/<name>.json`` as soon as
it ends ({"ok": bool, ...figures}), so a call cut short still leaves what it finished.

    python scripts/device_check.py OUT DEVICE [--smoke]

- ``resume``: a short real run on DEVICE killed by SIGKILL after its first epoch, then resumed to
  the end (exit 0, the right step count, a finite loss);
- ``methods``: one step of every registered method under the device's low precision (fp16 with a
  GradScaler on a GPU, bf16 on a CPU): finite loss and gradients;
- ``split_bn_layouts``: split BN's output and input gradient equal for NCHW and channels_last input;
- ``streamed_infonce_bf16``: the streamed InfoNCE under bf16 autocast against cross-entropy of the
  fp32 logits;
- ``host_reads``: 10 + 20 unlogged steps of the real loop for every method (``moco.host_reads``; MoCo
  v2 alone with ``--smoke``) and, on a GPU, the host-to-device copies a profiler sees in 10 steps;
- ``transfer``: ``moco transfer detect --masks`` and ``segment`` on DEVICE from the resume check's
  checkpoint, a moco and a random row each on a generated set: exit 0, finite losses, scores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(sys.argv[1])
DEVICE = torch.device(sys.argv[2])
SMOKE = "--smoke" in sys.argv
DATA = OUT / "folder"


def check(name: str) -> Callable[[Callable[[], dict[str, Any]]], None]:
    """Run the check now and write its JSON: its figures, ``ok``, and the error if it raised."""
    def run(body: Callable[[], dict[str, Any]]) -> None:
        started = time.time()
        try:
            result = body()
        except Exception as err:  # a check that crashes is a failed check; the others still run
            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.time() - started, 1)
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"== {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)"
              + (f" {result['error']}" if "error" in result else ""), flush=True)
    return run


def make_folder(images: int = 128, side: int = 24) -> Path:
    """A labelled folder of random PNGs in 4 classes (the device machine has no dataset)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = DATA / "train" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
        pixels[6 * (i % 4): 6 * (i % 4) + 6] += 150
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return DATA


def run_overrides(run: Path, epochs: int) -> list[str]:
    """A small MoCo v2 run on :func:`make_folder`'s images, on DEVICE."""
    precision = "bf16" if DEVICE.type == "cuda" else "fp32"
    return ["data.dataset=folder", f"data.root={DATA}", "data.image_size=16", "data.load_size=16", "data.val_size=32",
            "data.workers=0", "data.channels=3", "aug.crop_scale=[0.5,1.0]", "model.widths=[8,16,16,16]",
            "model.K=64", "model.bn_splits=2", "optim.batch_size=32", f"optim.epochs={epochs}",
            "optim.base_batch_size=32", "train.knn_every=1", "train.knn_k=5", f"train.device={DEVICE}",
            f"train.precision={precision}", "train.progress=false", "train.tensorboard=false",
            f"train.output_dir={run}"]


@check("resume")
def resume() -> dict[str, Any]:
    make_folder()
    run = OUT / "resume_run"
    config = OUT / "resume.yaml"
    config.write_text("{}\n")  # every option comes as an override
    command = [sys.executable, "-m", "moco", "pretrain", str(config), *run_overrides(run, 3)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoint_last.pth").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    second = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    steps = torch.load(run / "checkpoint_last.pth", map_location="cpu", weights_only=True)["step"]
    ok = second.returncode == 0 and steps == 3 * ((128 - 32) // 32) and np.isfinite(summary.get("final_loss", np.nan))
    return {"ok": bool(ok), "exit": second.returncode, "steps": steps, "final_loss": summary.get("final_loss"),
            "stderr_tail": second.stderr[-2000:]}


@check("methods")
def methods() -> dict[str, Any]:
    from moco.config import load_config
    from moco.methods import METHODS, Batch, StepContext, build_method

    fp16 = DEVICE.type == "cuda"
    results = {}
    for name in METHODS:
        heads = [f"{m}.mlp_dim=64" for m in ("moco_v3", "byol", "simclr", "swav")] + ["swav.prototypes=32"]
        config = load_config(None, [f"model.method={name}", "model.widths=[8,16,16,16]", "model.K=256",
                                    "model.bn_splits=1", "optim.batch_size=32", "data.image_size=16",
                                    *(heads if SMOKE else [])])
        torch.manual_seed(0)
        method = build_method(config, 3, DEVICE, bank_size=64).to(DEVICE).train()
        scaler = torch.amp.GradScaler(DEVICE.type, enabled=fp16)
        views = tuple(torch.randn(32, 3, 16, 16, device=DEVICE) for _ in range(2))
        with torch.autocast(DEVICE.type, dtype=torch.float16 if fp16 else torch.bfloat16):
            out = method.training_step(Batch(views, torch.arange(32, device=DEVICE)), StepContext(epoch=1))
        scaler.scale(out.loss).backward()
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(out.loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        results[name] = {"loss": float(out.loss.detach()), "finite": finite, "scale": float(scaler.get_scale()) if fp16 else None}
    return {"ok": all(r["finite"] for r in results.values()), "precision": "fp16+GradScaler" if fp16 else "bf16",
            "methods": results}


@check("split_bn_layouts")
def split_bn_layouts() -> dict[str, Any]:
    from moco.models.split_bn import SplitBatchNorm2d

    torch.manual_seed(0)
    x = torch.randn(64, 32, 14, 14, device=DEVICE)
    outputs, grads = [], []
    for layout in (torch.contiguous_format, torch.channels_last):
        bn = SplitBatchNorm2d(32, num_splits=8).to(DEVICE).train()
        inp = x.clone().contiguous(memory_format=layout).requires_grad_(True)
        out = bn(inp)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        outputs.append(out.detach().contiguous())
        grads.append(inp.grad.contiguous())
    out_diff, grad_diff = float((outputs[0] - outputs[1]).abs().max()), float((grads[0] - grads[1]).abs().max())
    return {"ok": out_diff < 1e-4 and grad_diff < 1e-4, "max_output_difference": out_diff,
            "max_gradient_difference": grad_diff}


@check("streamed_infonce_bf16")
def streamed_infonce() -> dict[str, Any]:
    from moco.loss import info_nce_logits, info_nce_loss_and_stats

    torch.manual_seed(0)
    q = F.normalize(torch.randn(256, 128, device=DEVICE), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(256, 128, device=DEVICE), dim=1)
    negatives = F.normalize(torch.randn(128, 16384 if not SMOKE else 1024, device=DEVICE), dim=0)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, _ = info_nce_loss_and_stats(q, k, negatives, 0.2)
    (grad,) = torch.autograd.grad(loss, q)
    logits = info_nce_logits(q, k, negatives, 0.2)
    expected = F.cross_entropy(logits, torch.zeros(256, dtype=torch.long, device=DEVICE))
    (expected_grad,) = torch.autograd.grad(expected, q)
    loss, expected = float(loss.detach()), float(expected.detach())
    loss_diff, grad_diff = abs(loss - expected), float((grad - expected_grad).abs().max())
    return {"ok": loss_diff < 1e-4 and grad_diff < 1e-6, "loss": loss, "loss_difference": loss_diff,
            "max_gradient_difference": grad_diff}


@check("host_reads")
def host_reads() -> dict[str, Any]:
    from moco.config import load_config
    from moco.host_reads import loop_reads
    from moco.methods import METHODS

    if not DATA.is_dir():
        make_folder()
    results = {}
    for name in (["moco"] if SMOKE else METHODS):  # the suite counts every method (tests/test_host_reads.py)
        with tempfile.TemporaryDirectory() as run:
            config = load_config(None, run_overrides(Path(run), 1) + [
                f"model.method={name}", "train.log_every=1000", "train.knn_every=0", "train.test_knn=false",
                "optim.batch_size=8", "model.bn_splits=1", "data.val_size=0",
                *(f"{m}.mlp_dim=64" for m in ("moco_v3", "byol", "simclr", "swav")), "swav.prototypes=32"])
            few, more = loop_reads(config, 10 if not SMOKE else 3)
            results[name] = {"reads_per_step": (sum(few.values()) + sum(more.values())) / (30 if not SMOKE else 9),
                             "sites": dict(more)}
    copies = _host_to_device_copies() if DEVICE.type == "cuda" else None
    return {"ok": all(r["reads_per_step"] == 0 for r in results.values()), "methods": results,
            "host_to_device_copies_in_10_steps": copies}


def _host_to_device_copies() -> int:
    """Host-to-device copies in 10 steps of the real MoCo v2 loop on the in-memory folder."""
    from torch.profiler import ProfilerActivity, profile

    from moco.config import load_config
    from moco.train import set_up, train_step

    with tempfile.TemporaryDirectory() as run:
        config = load_config(None, run_overrides(Path(run), 1) + ["train.knn_every=0", "optim.batch_size=8"])
        loop = set_up(config, resume=None, overwrite=False)
        batches = [(images, indices) for _, (images, _, indices) in zip(range(11), loop.loader)]
        train_step(loop, 0, *batches[0])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for images, indices in batches[1:]:
                train_step(loop, 0, images, indices)
            torch.cuda.synchronize()
        loop.log.close()
    return sum(e.count for e in prof.key_averages() if "HtoD" in e.key)


def write_transfer_data(root: Path, images: int = 12, side: int = 48) -> None:
    """Noise with one or two bright squares of two categories: a COCO json with polygon masks
    (``root/ann.json``) and label maps (``root/images``, ``root/labels``) of the same images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    entries, annotations = [], []
    for i in range(images):
        pixels = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
        labels = np.zeros((side, side), np.uint8)
        for category in range(1, 1 + 1 + i % 2):
            size = int(rng.integers(10, 20))
            x, y = (int(v) for v in rng.integers(0, side - size, 2))
            pixels[y:y + size, x:x + size] = 110 + 60 * category
            labels[y:y + size, x:x + size] = category
            polygon = [x, y, x + size, y, x + size, y + size, x, y + size]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [x, y, size, size], "area": size * size, "iscrowd": 0,
                                "segmentation": [[float(v) for v in polygon]]})
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(labels).save(root / "labels" / f"{i:03d}.png")
        entries.append({"id": i + 1, "file_name": f"images/{i:03d}.png", "width": side, "height": side})
    categories = [{"id": 1, "name": "dim"}, {"id": 2, "name": "bright"}]
    (root / "ann.json").write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))


@check("transfer")
def transfer() -> dict[str, Any]:
    """moco transfer detect (Mask R-CNN) and segment (FCN) on DEVICE, from the resume check's
    checkpoint: a moco and a random row each, finite losses, scores, the rows' device."""
    checkpoint = OUT / "resume_run" / "checkpoint_last.pth"
    data = OUT / "transfer_data"
    write_transfer_data(data)
    common = [str(checkpoint), "--init", "moco", "random", "--epochs", "2", "--batch-size", "4", "--device",
              str(DEVICE), "--threads", "2", "--no-progress"]
    commands = {
        "detect": ["detect", *common, "--masks", "--train", str(data / "ann.json"), "--val", str(data / "ann.json"),
                   "--output", str(OUT / "transfer_detect")],
        "segment": ["segment", *common, "--train", str(data), "--val", str(data), "--output", str(OUT / "transfer_segment")]}
    results: dict[str, Any] = {}
    for task, args in commands.items():
        done = subprocess.run([sys.executable, "-m", "moco", "transfer", *args], capture_output=True, text=True,
                              timeout=240)
        written = OUT / f"transfer_{task}" / f"{task}.json"
        found = json.loads(written.read_text()) if written.is_file() else {"rows": [], "device": None}
        rows = found["rows"]
        finite = [bool(np.isfinite(r.get("final_loss", np.nan))) and bool(r["metrics"]) for r in rows]
        results[task] = {"exit": done.returncode, "rows": len(rows), "finite": all(finite) and len(rows) == 2,
                         "device": found["device"], "metrics": {r["init"]: r["metrics"] for r in rows},
                         "stderr_tail": done.stderr[-1500:]}
    ok = all(r["exit"] == 0 and r["finite"] and str(r["device"]).startswith(DEVICE.type) for r in results.values())
    return {"ok": ok, **results}
