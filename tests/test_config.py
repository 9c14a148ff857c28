"""Config loading: YAML + overrides, typed values, one-line errors naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco.cli import CONFIG_DIR
from moco.config import ConfigError, load_config, save_config, validate
from moco.methods import METHODS


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path: Path, tmp_path: Path) -> None:
    """Each shipped config loads and validates, names a registered method with its own section,
    keeps every value the file sets (none dropped or renamed) and round-trips through save/load."""
    written = yaml.safe_load(path.read_text())
    config = load_config(path)
    assert config.model.method in METHODS
    assert isinstance(config.method_options(), METHODS[config.model.method].Options)
    values = config.to_dict()
    for section, options in written.items():
        for key, value in options.items():
            assert values[section][key] == value, f"{path.name}: {section}.{key} is {values[section][key]!r}, not {value!r}"
    validate(config)
    saved = tmp_path / path.name
    save_config(config, saved)
    assert load_config(saved).to_dict() == values


def test_overrides_are_parsed_as_yaml() -> None:
    config = load_config(None, ["optim.lr=0.1", "model.widths=[8,16,32,64]", "model.K=1024", "data.root=/x"])
    assert config.optim.lr == 0.1 and config.model.widths == [8, 16, 32, 64]
    assert config.model.K == 1024 and config.data.root == "/x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "unknown option optim.lrr; did you mean optim.lr?"),
        ("model.K=1000", "model.K: queue size 1000 must be a multiple"),
        ("model.m=1.5", "model.m: momentum must lie in [0, 1]"),
        ("model.T=0", "model.T: temperature must be > 0"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("optim.epochs=two", "optim.epochs: expected int"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("aug.preset=v9", "aug.preset: 'v9' is not one of"),
        ("model.bn_splits=3", "model.bn_splits: 3 must divide"),
    ],
)
def test_bad_values_name_the_option(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(("dataset", "split", "message"), [
    ("cifar10", "test", "data.train_split: 'test' is not one of train for data.dataset=cifar10"),
    ("cifar100", "unlabeled", "data.train_split: 'unlabeled' is not one of train for data.dataset=cifar100"),
    ("fashion_mnist", "tran", "data.train_split: 'tran' is not one of train for data.dataset=fashion_mnist"),
    ("stl10", "test", "data.train_split: 'test' is not one of train, unlabeled, train+unlabeled for "
                      "data.dataset=stl10"),
    ("stl10", "unlabelled", "data.train_split: 'unlabelled' is not one of train, unlabeled, train+unlabeled for "
                            "data.dataset=stl10"),
    ("folder", "test", "data.train_split: 'test' is the test split of data.dataset=folder; name another sub-folder"),
])
def test_a_train_split_the_dataset_lacks_or_its_test_split_is_refused(dataset: str, split: str, message: str) -> None:
    """torchvision's CIFAR reads any split name but 'train' as its test split: never pretrain on it."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.dataset={dataset}", f"data.train_split={split}"])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(("dataset", "split"), [("cifar10", "train"), ("stl10", "unlabeled"),
                                                ("stl10", "train+unlabeled"), ("folder", "unlabeled"), ("folder", "train")])
def test_the_train_splits_each_dataset_has_are_accepted(dataset: str, split: str) -> None:
    assert load_config(None, [f"data.dataset={dataset}", f"data.train_split={split}"]).data.train_split == split


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_floats_that_yaml_reads_as_strings_are_numbers() -> None:
    config = load_config(None, ["optim.weight_decay=1e-4", "optim.lr=3e-2"])
    assert config.optim.weight_decay == 1e-4 and config.optim.lr == 0.03


def test_optimizer_choice_builds_sgd_or_adamw() -> None:
    import torch

    from moco.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(load_config(None, ["optim.momentum=0.8", "optim.weight_decay=1e-4"]), params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8 and sgd.defaults["weight_decay"] == 1e-4
    adamw = build_optimizer(load_config(None, ["optim.optimizer=adamw", "optim.weight_decay=0.05"]), params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(ConfigError, match="optim.optimizer"):
        load_config(None, ["optim.optimizer=lamb"])


def test_channels_last_is_dropped_for_tiny_cpu_models_where_onednn_crashes() -> None:
    import torch

    from moco.runtime import resolve_memory_format

    cpu = torch.device("cpu")
    tiny = load_config(None, ["model.widths=[4,8,8,8]", "train.channels_last=true"])
    assert resolve_memory_format(tiny, cpu) == torch.contiguous_format
    small = load_config(None, ["model.widths=[8,16,32,64]", "train.channels_last=true"])
    assert resolve_memory_format(small, cpu) == torch.channels_last
    off = load_config(None, ["train.channels_last=false"])
    assert resolve_memory_format(off, cpu) == torch.contiguous_format
