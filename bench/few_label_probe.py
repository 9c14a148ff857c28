"""How much a frozen representation separates with few labels: logistic regression on 1% of them.

    python bench/few_label_probe.py CKPT [CKPT ...] [--fraction 0.01] [--seeds 0 1 2 3 4] \\
        [--C 0.01 0.1 1 10] [--cache-dir DIR] [--threads 2]

For each checkpoint: backbone features (encoder_q, head removed, unaugmented) of the training
and test splits, then for each seed the class-balanced label subset that ``moco finetune`` draws
(``balanced_subset``: 600 images at 1%), a multinomial logistic regression (scikit-learn, L-BFGS)
per C on raw and on standardised features (per-dimension mean and sd of the whole unlabelled
training split), and test top-1. It prints every seed and the mean over seeds per C.

The 1% fine-tuning row of ``moco finetune`` adds little to this number, so it is a cheap read of what pretraining can give at that label
budget. The best C is read on the test split: an oracle, for comparing representations, not a
result. ``--cache-dir`` keeps the features (``<name>.pt`` per checkpoint, the name taken from its
run directory) so that a second call skips the extraction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moco.evaluate.common import extract_feature_set, make_context
from moco.evaluate.finetune import balanced_subset


def features(checkpoint: str, cache_dir: Path | None, threads: int) -> dict[str, torch.Tensor]:
    cache = cache_dir / f"{Path(checkpoint).resolve().parent.name}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=True)
    ctx = make_context(checkpoint, threads=threads, output_dir=str(cache_dir) if cache_dir else None)
    fs = extract_feature_set(ctx.pretrained.backbone(), ctx)
    found = {"train": fs.train, "ty": fs.train_labels, "test": fs.test, "sy": fs.test_labels}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(found, cache)
    return found


def probe(fs: dict[str, torch.Tensor], fraction: float, seeds: list[int], cs: list[float]) -> dict[str, list[list[float]]]:
    """Test top-1 (%) per feature view, per seed, per C."""
    from sklearn.linear_model import LogisticRegression

    train, test = fs["train"].double(), fs["test"].double()
    mean, sd = train.mean(0), train.std(0) + 1e-8
    views = {"raw": (train, test), "standardised": ((train - mean) / sd, (test - mean) / sd)}
    scores: dict[str, list[list[float]]] = {name: [] for name in views}
    for seed in seeds:
        picks = balanced_subset(fs["ty"], fraction, seed)
        for name, (x, x_test) in views.items():
            row = []
            for c in cs:
                clf = LogisticRegression(C=c, max_iter=3000).fit(x[picks].numpy(), fs["ty"][picks].numpy())
                row.append(100 * clf.score(x_test.numpy(), fs["sy"].numpy()))
            scores[name].append(row)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], dest="cs")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for checkpoint in args.checkpoints:
        scores = probe(features(checkpoint, args.cache_dir, args.threads), args.fraction, args.seeds, args.cs)
        print(f"{checkpoint}: {args.fraction:g} of the labels, seeds {args.seeds}")
        for name, rows in scores.items():
            for seed, row in zip(args.seeds, rows):
                print(f"  {name:12s} seed {seed}: " + "  ".join(f"C={c:g} {a:.2f}" for c, a in zip(args.cs, row)))
            means = torch.tensor(rows).mean(0).tolist()
            best = max(range(len(means)), key=means.__getitem__)
            print(f"  {name:12s} mean:   " + "  ".join(f"C={c:g} {a:.2f}" for c, a in zip(args.cs, means))
                  + f"   best C={args.cs[best]:g}: {means[best]:.2f}")


if __name__ == "__main__":
    main()
