"""Training curves of a run directory: loss per step and kNN top-1 per epoch, as one PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


def plot_run(run_dir: str | os.PathLike, filename: str = "curves.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    knn = [r for r in epochs if "val_knn_top1" in r]
    test = [r for r in rows if r.get("kind") == "test"]

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        per_epoch = max(1, train[-1]["step"]) / max(1, train[-1]["epoch"])
        ax_loss.plot([r["step"] / per_epoch for r in train], [r["loss"] for r in train], lw=0.8, label="step")
    ax_loss.plot([r["epoch"] for r in epochs], [r["loss"] for r in epochs], "o-", label="epoch mean")
    ax_loss.set(xlabel="epoch", ylabel="InfoNCE loss", title="pretraining loss")
    ax_loss.legend()
    ax_knn.plot([r["epoch"] for r in knn], [r["val_knn_top1"] for r in knn], "o-", label="validation")
    for r in test:
        ax_knn.scatter([r["epoch"]], [r["test_knn_top1"]], marker="*", s=120, color="C3",
                       label=f"test {r['test_knn_top1']:.2f}%", zorder=3)
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="weighted kNN monitor (k=200)")
    if knn or test:
        ax_knn.legend()
    fig.tight_layout()
    out = run_dir / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
