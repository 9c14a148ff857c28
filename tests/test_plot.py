"""The run's curves: both kNN features are drawn where the run logged both, one curve otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from moco.plot import _knn_series, _test_points, plot_run


def _write_metrics(run_dir: Path, both_features: bool) -> None:
    rows = [{"kind": "train", "step": s, "epoch": s // 10, "loss": 6.0 - s / 10} for s in range(1, 21)]
    for epoch in (1, 2):
        row = {"kind": "epoch", "epoch": epoch, "loss": 5.0 - epoch, "val_knn_top1": 70.0 + epoch}
        if both_features:
            row.update(val_knn_top1_backbone=70.0 + epoch, val_knn_top1_encoder=72.0 + epoch)
        rows.append(row)
    test = {"kind": "test", "epoch": 2, "test_knn_top1": 75.0}
    if both_features:
        test.update(test_knn_top1_backbone=75.0, test_knn_top1_encoder=77.0, test_knn_top1_whitened=80.0)
    rows.append(test)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_both_features_are_drawn_when_logged(tmp_path: Path) -> None:
    _write_metrics(tmp_path, both_features=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [key for key, _, _ in _knn_series(epochs)] == ["val_knn_top1_backbone", "val_knn_top1_encoder"]
    assert [key for key, *_ in _test_points(rows[-1])] == ["test_knn_top1_backbone", "test_knn_top1_encoder"]
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 10_000


def test_older_runs_get_one_curve(tmp_path: Path) -> None:
    _write_metrics(tmp_path, both_features=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [key for key, _, _ in _knn_series([r for r in rows if r["kind"] == "epoch"])] == ["val_knn_top1"]
    assert [key for key, *_ in _test_points(rows[-1])] == ["test_knn_top1"]
    assert plot_run(tmp_path).is_file()
