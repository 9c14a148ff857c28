"""The MoCo paper's transfer table in miniature: MoCo vs supervised vs random init, detection and segmentation.

    python bench/transfer_table.py --root /tmp/table [--threads 1] [--jobs 2] [--seeds 0 1 2] [--fractions 1.0 0.1]
    python bench/transfer_table.py --root /tmp/table --table-only      # print the table of what has run

From scratch, each step a ``moco`` command (printed before it runs, its wall time kept in
ROOT/costs.json), each skipped when its output is already there, and every transfer command
resumable row by row:

1. MoCo v3 pretraining without labels on Fashion-MNIST's training split (the demo's ``fmnist_v3``);
2. the supervised start: the same backbone trained with the labels of those images for the same
   number of images seen (``moco transfer supervised``);
3. the scene set: Fashion-MNIST garments on ``--canvas`` px canvases (``moco transfer scenes``);
   train and val scenes from the training split's garments, test scenes from the test split's;
4. per label fraction and seed: Mask R-CNN (``moco transfer detect --masks``) and an FCN segmenter
   (``moco transfer segment``), every init with the same schedule (a label fraction takes as many
   steps as all labels), scored on the TEST scenes (``--eval val`` scores on the val scenes
   instead, for choosing the schedule); ``--jobs N`` runs N of these commands at once.

Then it prints the markdown table: per label fraction and init, mean ± std over seeds of box AP,
AP50, AP75, mask AP (COCOeval, %), mIoU and pixel accuracy (%), and each row's cost.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from moco.evaluate.common import markdown_table
from moco.transfer.common import INITS, mean_std, seeds_text

DETECT_METRICS = ("AP", "AP50", "AP75", "mask AP")
SEGMENT_METRICS = ("mIoU", "pixel accuracy")


def moco(*args: str) -> list[str]:
    return [sys.executable, "-m", "moco", *args]


COSTS_LOCK = threading.Lock()


def run_step(name: str, command: list[str], root: Path, required: bool = True) -> None:
    """Run one step, print its command and record its wall time in ROOT/costs.json. A transfer
    command that fails is recorded under "failed" and the table goes on; a failed pretraining,
    supervised or scene step stops it."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    tic = time.perf_counter()
    returncode = subprocess.run(command).returncode
    with COSTS_LOCK:
        costs_file = root / "costs.json"
        costs = json.loads(costs_file.read_text()) if costs_file.exists() else {}
        costs[name] = round(costs.get(name, 0.0) + time.perf_counter() - tic, 1)
        if returncode:
            costs["failed"] = sorted({*costs.get("failed", []), name})
        costs_file.write_text(json.dumps(costs, indent=2) + "\n")
    if returncode and required:
        raise SystemExit(f"{name} failed (exit status {returncode})")


def transfer_args(args: argparse.Namespace, fraction: float, task: str, seed: int) -> list[str]:
    """What a detect or segment command shares: the checkpoint, the rows, the schedule, the machine."""
    epochs, lr, warmup = ((args.detect_epochs, args.detect_lr, args.detect_warmup) if task == "detect"
                          else (args.segment_epochs, args.segment_lr, args.segment_warmup))
    return [str(args.root / "moco" / "checkpoint_last.pth"), "--init", *INITS, "--supervised",
            str(args.root / "supervised.pth"), "--seed", str(seed), "--label-fraction", f"{fraction:g}",
            "--epochs", str(epochs), "--lr", f"{lr:g}", "--warmup-iters", str(warmup),
            "--threads", str(args.threads), "--output", str(output_dir(args, task, fraction, seed)), "--no-progress"]


def output_dir(args: argparse.Namespace, task: str, fraction: float, seed: int) -> Path:
    """One folder per command, so that commands run at once never share a file."""
    return args.root / f"{task}_{args.eval}_labels{fraction:g}_seed{seed}"


def run_all(args: argparse.Namespace) -> None:
    root, threads = args.root, str(args.threads)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / "moco" / "checkpoint_last.pth"
    if not checkpoint.exists():
        run_step("pretrain", moco("pretrain", "fmnist_v3", f"train.threads={threads}", f"train.output_dir={root / 'moco'}",
                                  "train.progress=false"), root)
    if not (root / "supervised.pth").exists():
        run_step("supervised", moco("transfer", "supervised", str(checkpoint), "--output", str(root / "supervised.pth"),
                                    "--threads", threads, "--no-progress"), root)
    scenes = root / "scenes"
    if not (scenes / "scenes.json").exists():
        run_step("scenes", moco("transfer", "scenes", "--output", str(scenes), "--train", str(args.train_scenes),
                                "--val", str(args.val_scenes), "--test", str(args.test_scenes), "--canvas",
                                str(args.canvas), "--sizes", args.sizes, "--objects", args.objects), root)
    # One command per task, label fraction and seed, so that --jobs can run several at once.
    steps = []
    for fraction in args.fractions:
        for seed in args.seeds:
            steps.append((f"detect labels{fraction:g} seed{seed}", moco(
                "transfer", "detect", *transfer_args(args, fraction, "detect", seed), "--masks",
                "--train", str(scenes / "train" / "annotations.json"),
                "--val", str(scenes / args.eval / "annotations.json"))))
            steps.append((f"segment labels{fraction:g} seed{seed}", moco(
                "transfer", "segment", *transfer_args(args, fraction, "segment", seed),
                "--train", str(scenes / "train"), "--val", str(scenes / args.eval))))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda step: run_step(*step, root, required=False), steps))


def cell(values: list[float]) -> str | None:
    if not values:
        return None
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def rows_of(args: argparse.Namespace, task: str, fraction: float) -> list[dict[str, Any]]:
    """The finished rows a task's commands kept in their output folders (the last one of each init and seed)."""
    rows = []
    for seed in args.seeds:
        path = output_dir(args, task, fraction, seed) / "evaluation_rows.jsonl"
        rows += [json.loads(line)["value"] for line in path.read_text().splitlines()] if path.exists() else []
    return list({(r["init"], r["seed"]): r for r in rows}.values())


def mean_seconds(rows: list[dict[str, Any]]) -> float:
    trained = [r["train_seconds"] for r in rows if "train_seconds" in r]
    return sum(trained) / max(1, len(trained))


def table(args: argparse.Namespace) -> str:
    """Per label fraction and init: the metrics' mean ± std over the seeds that finished (a diverged
    row counted, not averaged), and the rows' mean training seconds (detection + segmentation)."""
    lines = []
    for fraction in args.fractions:
        detect = rows_of(args, "detect", fraction)
        segment = rows_of(args, "segment", fraction)
        for init in INITS:
            d = [r for r in detect if r["init"] == init]
            s = [r for r in segment if r["init"] == init]
            if not d and not s:
                continue
            metrics = [cell([r["metrics"][m] for r in d if r["metrics"].get(m) is not None]) for m in DETECT_METRICS]
            metrics += [cell([r["metrics"][m] for r in s if r["metrics"].get(m) is not None]) for m in SEGMENT_METRICS]
            seconds = [mean_seconds(d), mean_seconds(s)]
            lines.append([f"{fraction:.0%}", init, f"{seeds_text(d)} / {seeds_text(s)}", *metrics,
                          f"{seconds[0]:.0f} + {seconds[1]:.0f}"])
    headers = ["labels", "init", "seeds (det / seg)", "box AP", "AP50", "AP75", "mask AP", "mIoU", "pixel acc",
               "train s (det + seg)"]
    return markdown_table(headers, lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="where every step writes (skipped when already there)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every step")
    p.add_argument("--jobs", type=int, default=1, help="transfer commands run at once (each with --threads)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one row per init and seed")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1], help="label fractions, in this order")
    p.add_argument("--train-scenes", type=int, default=800, help="training scenes")
    p.add_argument("--val-scenes", type=int, default=200, help="validation scenes (choosing the schedule)")
    p.add_argument("--test-scenes", type=int, default=400, help="test scenes (the table)")
    p.add_argument("--canvas", type=int, default=64, help="scene side in pixels")
    p.add_argument("--sizes", default="14-32", help="garment sides in pixels (Fashion-MNIST's are 28)")
    p.add_argument("--objects", default="1-3", help="garments per scene")
    p.add_argument("--detect-epochs", type=int, default=4, help="Mask R-CNN epochs, every init")
    p.add_argument("--detect-lr", type=float, default=0.01, help="Mask R-CNN lr at batch 8, every init")
    p.add_argument("--detect-warmup", type=int, default=100, help="Mask R-CNN linear warm-up steps")
    p.add_argument("--segment-epochs", type=int, default=40, help="segmenter epochs, every init")
    p.add_argument("--segment-lr", type=float, default=0.02, help="segmenter lr at batch 16, every init")
    p.add_argument("--segment-warmup", type=int, default=50, help="segmenter linear warm-up steps")
    p.add_argument("--eval", choices=("test", "val"), default="test",
                   help="score on the test scenes (the table) or the val scenes (choosing the schedule)")
    p.add_argument("--table-only", action="store_true", help="print the table of the rows finished so far")
    args = p.parse_args()
    if not args.table_only:
        run_all(args)
    print("\n" + table(args), end="")
    costs = args.root / "costs.json"
    if costs.exists():
        print("\nwall time per step (s): " + json.dumps(json.loads(costs.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
