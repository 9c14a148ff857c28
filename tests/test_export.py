"""Export: torchvision state dicts load strictly (apart from fc) and give the same features; the
detectron2 pickle has exactly detectron2's ResNet key set; only formats that work are offered."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from moco.cli import main
from moco.exporters import ExportError
from moco.exporters import export_checkpoint as export
from moco.models import backbone_features, resnet
from tests.eval_helpers import save_reference_checkpoint, save_tiny_moco_checkpoint

REPO = Path(__file__).resolve().parent.parent
NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_export_loads_strictly_apart_from_fc_and_gives_the_same_features(tmp_path: Path, arch: str) -> None:
    model = save_reference_checkpoint(tmp_path / "ckpt.pth.tar", arch, mlp=True)
    out = export(tmp_path / "ckpt.pth.tar", "torchvision", tmp_path / f"{arch}.pth")
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith(("module.", "encoder_q.", "fc.")) for k in state)
    net = getattr(torchvision.models, arch)()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    model.eval(), net.eval()
    torch.testing.assert_close(net(images), backbone_features(model.encoder_q, images))
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["torchvision_constructor"] == f"torchvision.models.{arch}"


def test_cpu_sized_export_loads_into_our_resnet_with_the_recorded_arguments(tmp_path: Path) -> None:
    path, model = save_tiny_moco_checkpoint(tmp_path)
    out = export(path, "torchvision", tmp_path / "tiny.pth")
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["torchvision_constructor"] is None
    net = resnet(**meta["moco_resnet_kwargs"])
    result = net.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    images = torch.randn(3, 1, 28, 28)
    model.eval(), net.eval()
    torch.testing.assert_close(net(images), backbone_features(model.encoder_q, images))


def expected_detectron2_resnet50_keys() -> set[str]:
    """detectron2's names for a ResNet-50 backbone, written out from its layout."""
    keys = {"stem.conv1.weight"} | {f"stem.conv1.norm.{n}" for n in NORM}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            for conv in (1, 2, 3):
                keys.add(f"res{stage}.{b}.conv{conv}.weight")
                keys |= {f"res{stage}.{b}.conv{conv}.norm.{n}" for n in NORM}
        keys.add(f"res{stage}.0.shortcut.weight")
        keys |= {f"res{stage}.0.shortcut.norm.{n}" for n in NORM}
    return keys


def test_detectron2_export_of_a_random_resnet50_has_exactly_the_expected_keys(tmp_path: Path) -> None:
    model = save_reference_checkpoint(tmp_path / "r50.pth.tar", "resnet50", mlp=True)
    out = export(tmp_path / "r50.pth.tar", "detectron2", tmp_path / "r50.pkl")
    with open(out, "rb") as handle:
        obj = pickle.load(handle)
    assert set(obj) == {"model", "__author__", "matching_heuristics"}
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    assert set(obj["model"]) == expected_detectron2_resnet50_keys()
    assert len(obj["model"]) == 6 + 16 * 18 + 4 * 6
    q = model.encoder_q.state_dict()
    for d2, tv in [("stem.conv1.norm.running_var", "bn1.running_var"), ("res3.0.shortcut.weight", "layer2.0.downsample.0.weight"),
                   ("res5.2.conv3.norm.weight", "layer4.2.bn3.weight"), ("res4.5.conv2.weight", "layer3.5.conv2.weight")]:
        assert isinstance(obj["model"][d2], np.ndarray)
        np.testing.assert_array_equal(obj["model"][d2], q[tv].numpy())


def test_detectron2_refuses_small_stems_and_timm_refuses_resnets(tmp_path: Path) -> None:
    path, _ = save_tiny_moco_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="detectron2's ResNet has torchvision's shape"):
        export(path, "detectron2", tmp_path / "x.pkl")
    with pytest.raises(ExportError, match="--format timm writes Vision Transformers; for this ResNet use --format torchvision"):
        export(path, "timm", tmp_path / "x.pth")
    with pytest.raises(ExportError, match="--format: 'onnx' is not one of torchvision, detectron2, timm"):
        export(path, "onnx", tmp_path / "x.pth")
    assert not (tmp_path / "x.pkl").exists() and not (tmp_path / "x.pth").exists()


def test_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = save_tiny_moco_checkpoint(tmp_path, ddp_prefix=True)
    result = subprocess.run([sys.executable, "-m", "moco", "export", str(path), "--format", "torchvision",
                             "--output", str(tmp_path / "out.pth")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.pth").is_file() and (tmp_path / "out.pth.json").is_file()
    capsys.readouterr()
    # timm takes ViTs: for this ResNet a one-line error, no traceback, no file
    assert main(["export", str(path), "--format", "timm", "--output", str(tmp_path / "out_timm.pth")]) == 2
    assert "--format timm writes Vision Transformers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    assert "--format {torchvision,detectron2,timm}" in capsys.readouterr().out
    assert not (tmp_path / "out_timm.pth").exists()


def test_detectron2_configs_are_complete_and_point_at_existing_bases() -> None:
    configs = sorted((REPO / "detection" / "configs").glob("*.yaml"))
    names = {c.stem for c in configs}
    assert {"voc_R_50_C4_24k_moco", "voc_R_50_FPN_24k_moco", "coco_R_50_C4_1x_moco", "coco_R_50_FPN_1x_moco"} <= names
    for config in configs:
        values = yaml.safe_load(config.read_text())
        chain = [values]
        while "_BASE_" in chain[-1]:
            base = config.parent / chain[-1]["_BASE_"]
            assert base.is_file(), f"{config.name}: missing base {base.name}"
            chain.append(yaml.safe_load(base.read_text()))
        merged: dict = {}
        for part in reversed(chain):
            _merge(merged, part)
        if config.stem.endswith("_moco"):
            r = merged["MODEL"]["RESNETS"]
            assert r["NORM"] == "SyncBN" and r["STRIDE_IN_1X1"] is False and r["DEPTH"] == 50
            assert merged["INPUT"]["FORMAT"] == "RGB" and merged["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0
            assert merged["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
            assert merged["MODEL"]["WEIGHTS"].endswith(".pkl")
            num_classes = merged["MODEL"]["ROI_HEADS"]["NUM_CLASSES"]
            assert num_classes == (20 if config.stem.startswith("voc") else 80)
            if "FPN" in config.stem:
                assert merged["MODEL"]["FPN"]["NORM"] == "SyncBN"


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if key == "_BASE_":
            continue
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
