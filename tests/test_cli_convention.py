"""One CLI convention: --version, described presets, --output on every command that writes (old
spellings kept), help on every argument, one spelling of device and threads, one probe lr grid,
and --print-config that shows the plan and its reasons without training."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from moco.cli import build_parser, main
from moco.presets import shipped_configs
from tests.tiny import fake_image_folder

COMMANDS = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
WRITERS = {"knn": "output_dir", "lincls": "output_dir", "finetune": "output_dir", "report": "output_dir",
           "embed": "out", "search": "out", "export": "output", "bench": "out", "ablate": "output"}


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "moco 0.1.0"


def test_configs_prints_one_described_line_per_preset(capsys: pytest.CaptureFixture) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_configs())
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # a name, then its description
    assert "the demo" in next(line for line in lines if line.startswith("fmnist_v3 "))


def test_every_argument_of_every_command_has_help() -> None:
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            assert action.help, f"moco {name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_command_that_writes_takes_output_and_the_old_spellings(command: str) -> None:
    parser, dest = COMMANDS[command], WRITERS[command]
    positional = {"knn": ["ckpt"], "lincls": ["ckpt"], "finetune": ["ckpt"], "report": ["ckpt"], "embed": ["ckpt", "d"],
                  "search": [], "export": ["ckpt"], "bench": [], "ablate": ["momentum"]}[command]
    spellings = [s for s in ("--output", "--out", "--output-dir") if s in parser._option_string_actions]
    assert spellings[0] == "--output" and len(spellings) == 3 or command == "export"
    for spelling in spellings:
        assert getattr(parser.parse_args([*positional, spelling, "x"]), dest) == "x"


def test_device_and_threads_are_spelled_and_explained_the_same_everywhere() -> None:
    for name, parser in COMMANDS.items():
        actions = parser._option_string_actions
        if "--device" in actions:
            assert actions["--device"].help.startswith("auto | cpu | cuda | cuda:N"), name
        if "--threads" in actions and name != "ablate":  # ablate's are per point
            assert actions["--threads"].help.startswith("CPU threads; 0 = all cores"), name
    assert {"--device", "--threads"} <= set(COMMANDS["pretrain"]._option_string_actions)


def test_lincls_and_report_probe_the_same_lr_grid() -> None:
    lincls = COMMANDS["lincls"].parse_args(["ckpt"]).lr
    report = COMMANDS["report"].parse_args(["ckpt"]).lincls_lr
    assert lincls == report == [30.0, 3.0, 0.3]


def test_print_config_shows_each_derived_value_with_its_reason_and_trains_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = fake_image_folder(tmp_path / "pictures")
    out_dir = tmp_path / "run"
    assert main(["pretrain", "folder", f"data.root={root}", f"train.output_dir={out_dir}", "--print-config",
                 "--device", "cpu", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["data"]["image_size"] == 16 and resolved["model"]["K"] == 64  # every auto resolved
    assert resolved["train"]["device"] == "cpu" and resolved["train"]["threads"] == 1
    assert "#   data.image_size=16 (12 px images upsampled" in printed
    assert "#   optim.batch_size=16 (a power of two up to 1/8 of 154 images" in printed
    assert "#   effective lr=0.00375 (optim.lr 0.06 x optim.batch_size 16 / optim.base_batch_size 256)" in printed
    # on a CPU the epochs are sized by the budget when the run starts: only the run can time its step
    assert resolved["train"]["budget"] == "15m" and resolved["optim"]["epochs"] == "auto"
    assert "#   optim.epochs=auto (sized when the run starts: it times its own step and fits its epochs into " \
           "train.budget=15m)" in printed
    assert not out_dir.exists()
