"""MoCo on real image folders against the two baselines it must beat: docs/own-images.md.

For each folder: ``moco pretrain folder data.root=FOLDER`` (the data-derived recipe, timed as a
user would run it), then weighted kNN (k=200, T=0.1) on the folder's test split for the MoCo
backbone, a randomly initialised encoder of the same shape, and raw pixels centred on the
training mean, at the same view size. Recipes are compared on the validation hold-out (the kNN
monitor); the test split is read once, here, for the reported numbers.

    python bench/make_real_folders.py --out /tmp/real
    python bench/own_data.py /tmp/real/clipart /tmp/real/photos /tmp/real/digits --out /tmp/own
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from moco.train import read_metrics


def pretrain(folder: Path, run_dir: Path, overrides: list[str]) -> float:
    """Run the CLI as a user would; returns the wall time in seconds."""
    command = [sys.executable, "-m", "moco", "pretrain", "folder", f"data.root={folder}",
               f"train.output_dir={run_dir}", "train.progress=false", *overrides]
    if run_dir.exists():
        command.append("--overwrite")
    print("$", " ".join(command), flush=True)
    tic = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - tic


def baselines(checkpoint: Path, threads: int) -> dict[str, float]:
    """Test kNN top-1 on the backbone and on the encoder output (head included) of the MoCo weights
    and of a random initialisation of the same shape, on centred raw pixels, and the share of the
    most frequent test class (what a collapsed encoder scores at best)."""
    from moco.evaluate.common import extract_feature_set, make_context, pixel_feature_set
    from moco.evaluate.report import KnnOptions, encoder_output_set, knn_rows

    ctx = make_context(checkpoint, output_dir=str(checkpoint.parent / "baselines"), device="cpu", threads=threads)
    options, n = KnnOptions(ks=(200,), whiten=False), ctx.data.num_classes
    torch.manual_seed(0)
    random_encoder = ctx.pretrained.spec.build_encoder().eval()
    random_backbone = ctx.pretrained.spec.build_backbone().eval()
    random_backbone.load_state_dict({k: v for k, v in random_encoder.state_dict().items() if not k.startswith("fc.")})
    moco = extract_feature_set(ctx.pretrained.backbone(), ctx)
    random = extract_feature_set(random_backbone, ctx)
    sets = {"moco_backbone": moco, "moco_encoder": encoder_output_set(ctx.pretrained.encoder(), moco),
            "random_backbone": random, "random_encoder": encoder_output_set(random_encoder, random),
            "raw_pixels": pixel_feature_set(ctx)}
    scores = {name: knn_rows(features, name, options, n)[0]["top1"] for name, features in sets.items()}
    counts = torch.bincount(moco.test_labels, minlength=n)
    return {**scores, "majority_class": 100 * counts.max().item() / counts.sum().item()}


def collapse_stats(run_dir: Path) -> dict[str, float]:
    """The last epoch's feature spread, as the loop logged it."""
    epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else {}
    return {key: last[key] for key in ("feature_std", "mean_cosine", "loss", "chance_loss") if key in last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/own_data"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="section.key=value for every run")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the runs already in --out (their wall times from its results.json)")
    args = parser.parse_args()
    overrides = list(args.set) + ([f"train.threads={args.threads}"] if args.threads else [])
    results = []
    earlier = json.loads((args.out / "results.json").read_text()) if args.evaluate_only else []
    for folder in args.folders:
        run_dir = args.out / folder.name
        if args.evaluate_only:
            seconds = next(r["wall_s"] for r in earlier if Path(r["folder"]).name == folder.name)
        else:
            seconds = pretrain(folder, run_dir, overrides)
        summary = json.loads((run_dir / "summary.json").read_text())
        config = (run_dir / "config.yaml").read_text()
        knn = baselines(run_dir / "checkpoint_last.pth", args.threads)
        epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch" and "val_knn_top1" in r]
        row = {"folder": str(folder), "wall_s": round(seconds, 1), "val_knn": summary["val_knn_top1"],
               "val_knn_backbone": epochs[-1]["val_knn_top1_backbone"], "val_knn_encoder": epochs[-1]["val_knn_top1_encoder"],
               **{f"test_knn_{k}": v for k, v in knn.items()}, **collapse_stats(run_dir), "config": config}
        results.append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| folder | wall | val kNN, last (backbone / encoder output) | test kNN, MoCo: backbone / encoder output "
          "| random init: backbone / encoder output | raw pixels (centred) | majority class |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {Path(r['folder']).name} | {r['wall_s'] / 60:.1f} min | {r['val_knn_backbone']:.2f} / "
              f"{r['val_knn_encoder']:.2f} | {r['test_knn_moco_backbone']:.2f} / {r['test_knn_moco_encoder']:.2f} | "
              f"{r['test_knn_random_backbone']:.2f} / {r['test_knn_random_encoder']:.2f} | "
              f"{r['test_knn_raw_pixels']:.2f} | {r['test_knn_majority_class']:.2f} |")


if __name__ == "__main__":
    main()
