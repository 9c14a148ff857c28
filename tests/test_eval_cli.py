"""The evaluation commands on tiny checkpoints and Fashion-MNIST subsets: `moco report` through a real
subprocess, the others in-process; each writes its JSON and markdown into the run directory."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from moco.cli import main
from moco.evaluate.common import make_context
from moco.evaluate.knn import extract_features, knn_accuracies
from tests.conftest import needs_fashion_mnist
from tests.eval_helpers import save_reference_checkpoint, save_tiny_moco_checkpoint

SMALL = ["data.train_subset=600", "data.test_subset=200"]


@needs_fashion_mnist
def test_report_runs_every_evaluation_and_baseline(tmp_path: Path) -> None:
    path, _ = save_tiny_moco_checkpoint(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "moco", "report", str(path), *SMALL, "--k", "5", "20", "--lincls-epochs", "2",
         "--lincls-lr", "1.0", "--lincls-augmented-epochs", "1", "--finetune-steps", "3", "--fractions", "0.1", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["provenance"]["train_images"] == 600 and report["provenance"]["checkpoint_kind"] == "moco"
    assert {(r["features"], r["k"]) for r in report["knn"]} == {
        (f, k) for f in ("MoCo", "MoCo (PCA-whitened)", "MoCo (encoder output)", "random init",
                         "random init (PCA-whitened)", "raw pixels")
        for k in (5, 20)}
    assert {(r["features"], r["mode"], r["epochs"]) for r in report["lincls"]} == {
        ("MoCo", "cached", 2), ("MoCo", "augmented", 1), ("random init", "cached", 2)}
    assert {(r["init"], r["fraction"]) for r in report["finetune"]} == {
        ("moco", 0.1), ("moco", 1.0), ("random", 0.1), ("random", 1.0), ("scratch", 1.0)}
    for row in report["knn"] + report["lincls"] + report["finetune"]:
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    # Raw pixels on Fashion-MNIST are far above chance even with 600 training images.
    assert next(r for r in report["knn"] if r["features"] == "raw pixels" and r["k"] == 20)["top1"] > 60.0
    markdown = (tmp_path / "report.md").read_text()
    assert "| representation | kNN (k=20) | linear (cached, 2 ep) | linear (augmented, 1 ep) | fine-tune 10% labels |" in markdown
    for label in ("| MoCo |", "| MoCo (PCA-whitened) |", "| MoCo (encoder output) |", "| random init |", "| raw pixels |", "| supervised from scratch |"):
        assert label in markdown
    assert markdown in result.stdout


@needs_fashion_mnist
def test_knn_lincls_finetune_commands_write_their_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = save_tiny_moco_checkpoint(tmp_path, ddp_prefix=True)
    assert main(["knn", str(path), *SMALL, "--k", "1", "10", "--chunk-size", "64"]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert [(r["features"], r["k"]) for r in knn["rows"]] == [
        ("MoCo", 1), ("MoCo", 10), ("MoCo (encoder output)", 1), ("MoCo (encoder output)", 10)]
    assert knn["options"]["feature"] == "both"  # the checkpoint has a head
    assert main(["knn", str(path), *SMALL, "--k", "10", "--whiten", "--feature", "backbone"]) == 0
    rows = json.loads((tmp_path / "knn.json").read_text())["rows"]
    assert [(r["features"], r["k"]) for r in rows] == [("MoCo", 10), ("MoCo (PCA-whitened)", 10)]
    assert rows[0]["top1"] == next(r for r in knn["rows"] if r["k"] == 10)["top1"]  # the standard row is unchanged
    assert main(["lincls", str(path), *SMALL, "--mode", "both", "--epochs", "5", "--lr", "1.0", "0.1"]) == 0
    lincls = json.loads((tmp_path / "lincls.json").read_text())
    assert [r["mode"] for r in lincls["rows"]] == ["cached", "augmented"]
    assert lincls["options"]["milestones"] == []  # 60 and 80 lie past 5 epochs
    # The lr was chosen once, on a holdout of the training split, and used by both modes.
    selection = lincls["rows"][0]["lr_selection"]
    assert set(selection) == {"1", "0.1"}
    assert lincls["rows"][0]["lr"] == lincls["rows"][1]["lr"] == max((1.0, 0.1), key=lambda lr: selection[f"{lr:g}"])
    out = tmp_path / "elsewhere"
    assert main(["finetune", str(path), *SMALL, "--steps", "2", "--fractions", "0.1", "--init", "scratch",
                 "--output-dir", str(out)]) == 0
    finetune = json.loads((out / "finetune.json").read_text())
    assert [(r["init"], r["labels"], r["steps"]) for r in finetune["rows"]] == [("scratch", 600, 2)]
    assert "| supervised from scratch | 100% | 600 | 0 | 2 | 0.1 |" in (out / "finetune.md").read_text()
    capsys.readouterr()


@needs_fashion_mnist
def test_reference_checkpoint_is_evaluated_without_key_editing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The reference's layout (module.encoder_q.*, state_dict, arch) and no stored config: data from the
    # defaults (Fashion-MNIST), so a 1-channel small-image encoder.
    model = save_reference_checkpoint(tmp_path / "ref.pth.tar", "resnet18", mlp=True, small_images=True,
                                      in_channels=1, widths=(4, 8, 8, 8))
    assert main(["knn", str(tmp_path / "ref.pth.tar"), *SMALL, "--k", "20"]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["provenance"]["checkpoint_kind"] == "reference"
    # The same number as kNN on the query encoder of the model that was saved.
    ctx = make_context(tmp_path / "ref.pth.tar", SMALL)
    feats = [extract_features(model.encoder_q, ctx.loader(ds), ctx.preprocess) for ds in (ctx.data.full_train, ctx.data.test)]
    expected = knn_accuracies(*feats[0], *feats[1], ks=(20,), num_classes=10)[20]["top1"]
    assert knn["rows"][0]["top1"] == pytest.approx(expected, abs=1e-6)
    # --feature encoder: kNN on the query encoder's own output, MLP head included.
    assert main(["knn", str(tmp_path / "ref.pth.tar"), *SMALL, "--k", "20", "--feature", "encoder"]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    feats = [extract_features(model.encoder_q, ctx.loader(ds), ctx.preprocess, head=True)
             for ds in (ctx.data.full_train, ctx.data.test)]
    expected = knn_accuracies(*feats[0], *feats[1], ks=(20,), num_classes=10)[20]["top1"]
    assert [r["features"] for r in knn["rows"]] == ["MoCo (encoder output)"]
    assert knn["rows"][0]["top1"] == pytest.approx(expected, abs=1e-6)
    # An RGB encoder on gray images is named as such, not a shape error deep inside a convolution.
    save_reference_checkpoint(tmp_path / "rgb.pth.tar", "resnet18", mlp=False, small_images=True, widths=(4, 8, 8, 8))
    capsys.readouterr()
    assert main(["knn", str(tmp_path / "rgb.pth.tar"), *SMALL]) == 2
    assert "takes 3-channel images but fashion_mnist has 1; set data.channels=3" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["knn", str(tmp_path / "missing.pth")]) == 2
    assert capsys.readouterr().err.strip() == f"moco: error: checkpoint {tmp_path / 'missing.pth'} does not exist"
    with pytest.raises(SystemExit):
        main(["lincls", str(tmp_path / "missing.pth"), "--lr", "-1"])
    assert "argument --lr: must be > 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", str(tmp_path / "missing.pth"), "--fractions", "2"])
    assert "label fractions lie in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "lincls"])
def test_a_probe_that_moved_its_frozen_backbone_is_one_error_line(command: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Not a traceback, whichever command ran the probe: `moco: error: ...` and exit code 1."""
    import torch

    from moco import cli_eval
    from moco.evaluate import linear, report

    bn = torch.nn.BatchNorm1d(2)
    before = linear.snapshot(bn)
    bn.running_mean += 1

    def moved(*_: object, **__: object) -> None:
        linear.check_unchanged(bn, before)

    ctx = SimpleNamespace(pretrained=SimpleNamespace(backbone=lambda: bn))
    monkeypatch.setattr(cli_eval, "_context", lambda _: ctx)
    monkeypatch.setattr(report, "run_report", moved)
    monkeypatch.setattr(linear, "run_lincls", moved)
    assert main([command, str(tmp_path / "ckpt.pth")]) == 1
    assert capsys.readouterr().err == ("moco: error: the frozen backbone changed during linear-probe training "
                                       "(1 tensors, e.g. running_mean); the probe's accuracy would not measure the "
                                       "pretrained weights\n")
