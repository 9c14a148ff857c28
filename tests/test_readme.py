"""Every shell command and Python snippet of README.md and docs/getting-started.md runs, in order,
in a scratch folder that holds `pictures/` (a tiny labelled image folder with a test split), so
no example rots.

The substitutions, and nothing else:
- `moco pretrain ...` (and `moco.pretrain(...)`) train one epoch without the per-epoch kNN monitor
  (TINY below); a run of the real length takes minutes;
- `moco report` skips fine-tuning and probes for 2 epochs, `moco lincls` for 2 epochs;
- `moco transfer scenes` writes 16 / 4 / 4 scenes of 64 px, `moco transfer detect|segment` train
  one epoch of seed 0 on one thread;
- `torchrun --nproc_per_node=N` runs with N = 2, whatever the page says;
- commands in SKIPPED are not run here, for the reason given with each; a command that is
  neither run nor skipped fails the test, so a new example must be one or the other.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moco
from moco.api import RunSummary
from moco.api import pretrain as real_pretrain
from moco.cli import main
from tests.tiny import fake_image_folder

REPO = Path(__file__).resolve().parent.parent
TINY = ["optim.epochs=1", "optim.warmup_epochs=0", "train.knn_every=0", "train.progress=false", "train.tensorboard=false", "data.workers=0"]
EXTRA = {"report": ["--no-finetune", "--lincls-epochs", "2", "--no-progress"], "lincls": ["--epochs", "2", "--no-progress"],
         "knn": ["--no-progress"]}
TRANSFER_EXTRA = {"scenes": ["--train", "16", "--val", "4", "--test", "4", "--canvas", "64", "--sizes", "14-32"],
                  "detect": ["--epochs", "1", "--seed", "0", "--threads", "1", "--no-progress"],
                  "segment": ["--epochs", "1", "--seed", "0", "--threads", "1", "--no-progress"]}
SKIPPED = {
    "bash scripts/demo.sh": "the README's contract, minutes long: run as it stands by a fresh machine, not here",
    "bash scripts/test.sh": "runs this very suite",
    "pip install": "installs the package: the fresh-environment check does that",
    "python3 -m venv": "creates the environment the install goes into",
}


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced ``bash`` or ``python`` block, in order."""
    return [(lang, text) for lang, text in re.findall(r"^```(\w+)\n(.*?)^```", path.read_text(), flags=re.M | re.S)
            if lang in ("bash", "python")]


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined, `&&` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def make_pictures(root: Path) -> None:
    """`pictures/train/<class>/` from tests.tiny (64 images: every derived run takes 3 steps an epoch),
    and a test split of 8 images per class."""
    fake_image_folder(root, train=64)
    for class_dir in sorted((root / "train").iterdir()):
        (root / "test" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:8]:
            (root / "test" / class_dir.name / image.name).write_bytes(image.read_bytes())


def run_shell(command: str) -> None:
    """One documented command, with the substitutions of the module docstring."""
    words = shlex.split(command)
    if any(command.startswith(prefix) for prefix in SKIPPED) or words[0] == ".":
        return
    if words[0] == "moco":
        args = words[1:]
        extra = TINY if args[:1] == ["pretrain"] and "--print-config" not in args else EXTRA.get(args[0], [])
        if args[:1] == ["transfer"]:
            extra = TRANSFER_EXTRA[args[1]]
        if args[:1] == ["pretrain"]:
            args = [a for a in args if not a.startswith("--overwrite")]
        try:
            code = main([*args, *extra])
        except SystemExit as exit_:  # --version, --help
            code = exit_.code
        assert code == 0, command
    elif words[0] == "torchrun":
        args = ["--nproc_per_node=2" if a.startswith("--nproc_per_node") else a for a in words[1:]]
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args, *TINY],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        pytest.fail(f"{command!r} is neither run by this test nor in SKIPPED")


def run_python(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A documented snippet, with moco.pretrain cut to TINY's length."""
    def tiny_pretrain(config: object = "fmnist_v3", **options: object) -> RunSummary:
        tiny = {key.replace(".", "__"): yaml.safe_load(value) for key, value in (o.split("=") for o in TINY)}
        return real_pretrain(config, **{**options, **tiny})

    monkeypatch.setattr(moco, "pretrain", tiny_pretrain)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_every_example_runs_as_written(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_pictures(tmp_path / "pictures")
    blocks = code_blocks(REPO / page)
    assert blocks
    for language, text in blocks:
        if language == "python":
            run_python(text, monkeypatch)
        else:
            for command in shell_commands(text):
                run_shell(command)
