"""Training curves of a run directory: loss per step and kNN top-1 (and the online probe's) per epoch, as one PNG."""

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
    for key, label, colour in _knn_series(knn):
        ax_knn.plot([r["epoch"] for r in knn], [r[key] for r in knn], "o-", color=colour, label=label)
    probed = [r for r in epochs if "online_probe_acc" in r]
    if probed:  # train.online_probe: the linear classifier trained beside the run, on the same images
        ax_knn.plot([r["epoch"] for r in probed], [r["online_probe_acc"] for r in probed], "s--", color="C4",
                    label="validation, online linear probe")
    for r in test:
        for key, name, colour, marker in _test_points(r):
            prefix = f"test, {name}" if name else "test"
            ax_knn.scatter([r["epoch"]], [r[key]], marker=marker, s=120, color=colour,
                           label=f"{prefix} {r[key]:.2f}%", zorder=3)
    ax_knn.set(xlabel="epoch", ylabel="top-1 (%)" if probed else "kNN top-1 (%)",
               title="weighted kNN monitor (k=200)" + (" and online probe" if probed else ""))
    if knn or test or probed:
        ax_knn.legend()
    fig.tight_layout()
    out = run_dir / filename
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _knn_series(knn: list[dict]) -> list[tuple[str, str, str]]:
    """Validation curves to draw: backbone and encoder output where the run logged both."""
    if knn and all("val_knn_top1_backbone" in r and "val_knn_top1_encoder" in r for r in knn):
        return [("val_knn_top1_backbone", "validation, backbone", "C0"),
                ("val_knn_top1_encoder", "validation, encoder output", "C1")]
    return [("val_knn_top1", "validation", "C0")]


def _test_points(row: dict) -> list[tuple[str, str, str, str]]:
    """Test-set markers: one per feature the run scored (the whitened diagnostic is left out)."""
    if "test_knn_top1_backbone" in row and "test_knn_top1_encoder" in row:
        return [("test_knn_top1_backbone", "backbone", "C3", "*"),
                ("test_knn_top1_encoder", "encoder output", "C2", "P")]
    return [("test_knn_top1", "", "C3", "*")]
