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
    # Off a terminal: the plan with its estimate, then a plain line per finished part, no bar.
    err = result.stderr
    assert err.startswith("report: 12 parts on 600 training / 200 test images (fashion_mnist, 28 px)")
    assert "  estimate: about " in err and "[1/12] kNN, MoCo: k=5 top-1 " in err and "\r" not in err
    assert "[12/12] scratch 100% seed 0: top-1 " in err
    assert report["complete"] and report["pending"] == []
    # Again: every part is kept, nothing is measured or trained, the same numbers are written.
    again = subprocess.run(result.args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "12 of 12 parts kept from an earlier run" in again.stderr and "probe:" not in again.stderr
    assert "in this run (12 parts kept from an earlier one)" in again.stdout
    assert "(quick protocol: a first look that favours the pretrained start; --protocol full measures the gain)" \
        in again.stdout
    kept = json.loads((tmp_path / "report.json").read_text())
    assert [r["top1"] for r in kept["finetune"]] == [r["top1"] for r in report["finetune"]]


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
    err = capsys.readouterr().err  # each command's plan, then a line per finished row
    for line in ("knn: 2 feature set(s) on 600 training / 200 test images", "[2/2] kNN, MoCo (encoder output): k=1 ",
                 "lincls: 2 probe(s) (cached, augmented)", "linear probe, MoCo (cached): lr choice 1 (1/2): ",
                 "[2/2] linear probe, MoCo (augmented): augmented top-1 ", "finetune: 1 rows",
                 "  protocol quick (the default on a CPU: ", "[1/1] scratch 100% seed 0: top-1 "):
        assert line in err, line


@needs_fashion_mnist
def test_an_interrupted_finetune_keeps_its_finished_rows_and_a_rerun_skips_them(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    from moco.evaluate import finetune

    path, _ = save_tiny_moco_checkpoint(tmp_path)
    command = ["finetune", str(path), *SMALL, "--steps", "2", "--lr", "0.05", "--fractions", "0.1", "--init", "moco",
               "random", "--no-progress", "--threads", "1"]
    row = finetune.finetune_row

    def killed_in_the_second_row(ctx, init, fraction, options):  # noqa: ANN001, ANN202
        if init == "random":
            os.kill(os.getpid(), signal.SIGTERM)
        return row(ctx, init, fraction, options)

    monkeypatch.setattr(finetune, "finetune_row", killed_in_the_second_row)
    assert main(command) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "[1/2] moco 10% seed 0: top-1 " in err and "stopped: 1 of 2 rows finished and kept in " in err
    kept = json.loads((tmp_path / "finetune.json").read_text())
    assert [(r["init"], r["fraction"]) for r in kept["rows"]] == [("moco", 0.1)]
    assert not kept["complete"] and kept["pending"] == ["random 10% seed 0"]
    assert "Unfinished: 1 row still to run (random 10% seed 0)" in (tmp_path / "finetune.md").read_text()

    monkeypatch.setattr(finetune, "finetune_row", row)
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "1 of 2 rows kept from an earlier run" in err and "[1/2] moco 10% seed 0: kept from an earlier run" in err
    assert "estimate: about " in err and "for 1 row (random 10% seed 0 " in err
    done = json.loads((tmp_path / "finetune.json").read_text())
    assert done["complete"] and done["rows"][0] == kept["rows"][0]  # the kept row, as it was
    assert [(r["init"], r["fraction"]) for r in done["rows"]] == [("moco", 0.1), ("random", 0.1)]
    assert len(done["gain"]) == 1 and done["options"]["protocol"] == "quick"  # the default on a CPU
    assert "quick protocol: a first look that favours the pretrained start" in (tmp_path / "finetune.md").read_text()
    assert main([*command, "--overwrite"]) == 0
    assert "kept from an earlier run" not in capsys.readouterr().err


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

    ctx = SimpleNamespace(pretrained=SimpleNamespace(backbone=lambda: bn), device=torch.device("cpu"),
                          run_dir=tmp_path, config=SimpleNamespace(train=SimpleNamespace(knn_centre=False)))
    monkeypatch.setattr(cli_eval, "_context", lambda _: ctx)
    monkeypatch.setattr(report, "report_tasks", moved)
    monkeypatch.setattr(linear, "lincls_tasks", moved)
    assert main([command, str(tmp_path / "ckpt.pth")]) == 1
    assert capsys.readouterr().err == ("moco: error: the frozen backbone changed during linear-probe training "
                                       "(1 tensors, e.g. running_mean); the probe's accuracy would not measure the "
                                       "pretrained weights\n")
