"""The Python API: ``import moco`` is light, every public name resolves and says what it is for,
and pretrain -> load_pretrained -> export works from Python as the command line does."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moco
from moco.config import ConfigError
from moco.models import resnet
from tests.tiny import tiny_config


def test_import_moco_loads_neither_torch_nor_a_submodule() -> None:
    probe = "import sys, moco; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('moco.')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_has_a_docstring_and_is_listed_by_dir() -> None:
    for name in moco.__all__:
        value = getattr(moco, name)
        assert name in dir(moco)
        if callable(value):
            assert inspect.getdoc(value), f"moco.{name} has no docstring"
    assert {"pretrain", "load_pretrained", "export", "METHODS", "load_config"} <= set(moco.__all__)
    with pytest.raises(AttributeError):
        moco.no_such_name  # noqa: B018
    from moco import distributed  # submodules still import through the lazy front door

    assert distributed.world_size() == 1


def test_load_config_takes_a_preset_and_section__key_overrides() -> None:
    config = moco.load_config("fmnist_v3", optim__epochs=2, model__T=0.3)
    assert (config.optim.epochs, config.model.T, config.model.method) == (2, 0.3, "moco_v3")
    assert moco.load_config(config).to_dict() == config.to_dict()
    assert moco.overrides({"data.root": "pics", "optim.epochs": 2}) == {"data__root": "pics", "optim__epochs": 2}
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        moco.load_config("fmnist_v3", optim__lrr=0.1)
    with pytest.raises(ConfigError, match="section__key"):
        moco.load_config("fmnist_v3", epochs=1)
    with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
        moco.load_config("no_such_preset")


def test_shipped_configs_describe_every_preset_in_one_line() -> None:
    presets = moco.shipped_configs()
    assert {"fmnist_v3", "folder", "folder_v3", "imagenet_r50_v2"} <= set(presets)
    for name, description in presets.items():
        assert description and "\n" not in description, name
        moco.load_config(name)  # each one is a valid config


def test_pretrain_load_and_export_from_python(tmp_path: Path) -> None:
    summary = moco.pretrain(tiny_config(tmp_path), optim__epochs=1, train__output_dir=str(tmp_path / "run"))
    assert summary.run_dir == tmp_path / "run" and summary.checkpoint.is_file()
    assert summary.details == json.loads((summary.run_dir / "summary.json").read_text())
    assert summary.test_knn == summary.details["test_knn_top1"] and 0 <= summary.test_knn <= 100
    assert list(summary.val_knn) == [1]

    with pytest.raises(ConfigError, match="--resume|--overwrite|resume|overwrite"):
        moco.pretrain(tiny_config(tmp_path), optim__epochs=1, train__output_dir=str(tmp_path / "run"))

    pretrained = moco.load_pretrained(summary.checkpoint)
    images = torch.rand(4, 1, 8, 8)
    backbone, encoder = pretrained.backbone(), pretrained.encoder()
    assert not backbone.training and backbone(images).shape == (4, 8)  # widths 4-8-8-8: 8 features
    assert encoder(images).shape == (4, 16)                            # model.dim 16 behind the head

    out = moco.export(summary.checkpoint, tmp_path / "backbone.pth")
    meta = json.loads((tmp_path / "backbone.pth.json").read_text())
    net = resnet(**meta["moco_resnet_kwargs"])
    missing = net.load_state_dict(torch.load(out, weights_only=True), strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    net.fc = torch.nn.Identity()
    torch.testing.assert_close(net.eval()(images), backbone(images))


def test_the_methods_registry_is_the_configs_choice() -> None:
    config = moco.load_config("fmnist_v3")
    assert set(moco.METHODS) == {"moco", "end_to_end", "memory_bank", "moco_v3", "simclr", "byol", "swav"}
    assert moco.method_class(config.model.method) is moco.METHODS["moco_v3"]
    assert all(issubclass(cls, moco.Method) for cls in moco.METHODS.values())
