"""The Python entry points: what ``moco pretrain`` and ``moco export`` do, callable from a script or
a notebook, with the same configs, checks and files as the command line.

Overrides are keyword arguments named ``section__key`` (two underscores for the dot of
``section.key=value`` on the command line), and their values are Python values, not YAML text::

    summary = moco.pretrain("folder", data__root="pictures", optim__epochs=30)

A dict of dotted names works too, for keys that are not Python identifiers or are built in a loop:
``moco.pretrain("folder", **moco.overrides({"data.root": "pictures"}))``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from moco.config import Config, ConfigError, from_dict

if TYPE_CHECKING:
    from moco.train import RunResult

DEFAULT_CONFIG = "fmnist_v3"  # the demo's preset, what `moco pretrain` trains when no config is named


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports, with where it wrote it.

    The same numbers are in ``run_dir/summary.json``; ``details`` holds that file's content (empty
    on the processes other than the first under ``torchrun``, which write no summary)."""

    run_dir: Path
    test_knn: float | None          # kNN top-1 (%) of the test split, None without labels or a test split
    val_knn: dict[int, float]       # the kNN monitor's top-1 (%) on the held-out images, by epoch
    final_loss: float
    seconds: float                  # wall time of this call, set-up and final kNN included
    checkpoint_error: str | None = None  # set when training finished but the last checkpoint was not written
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        """The run's last checkpoint, what ``moco.load_pretrained`` and the evaluation commands read."""
        return self.run_dir / "checkpoint_last.pth"


def overrides(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.epochs": 2}`` -> ``{"optim__epochs": 2}``: dotted option names as keyword overrides."""
    return {key.replace(".", "__"): value for key, value in dotted.items()}


def _set_overrides(values: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Set each ``section__key`` keyword into the nested dict ``values`` (in place) and return it."""
    for name, value in options.items():
        keys = name.split("__")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {name}={value!r}: name it section__key (e.g. optim__epochs=2)")
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {name}: {part} is not a section")
        node[keys[-1]] = value
    return values


def load_config(config: str | os.PathLike[str] | Config | None = DEFAULT_CONFIG, **options: Any) -> Config:
    """A validated `Config` from a shipped preset's name, a YAML path or a
    ``Config``, with ``section__key=value`` overrides applied.

    ``None`` starts from the defaults in `moco.config` alone. Errors are
    `ConfigError` and name the option, as on the command line."""
    from moco.config import read_config_file
    from moco.presets import resolve_config_path

    if isinstance(config, Config):
        values = config.to_dict()
    elif config is None:
        values = {}
    else:
        values = read_config_file(resolve_config_path(os.fspath(config)))
    return from_dict(_set_overrides(values, options))


def pretrain(config: str | os.PathLike[str] | Config | None = DEFAULT_CONFIG, *, resume: str | bool | None = None,
             overwrite: bool = False, **options: Any) -> RunSummary:
    """Pretrain as ``moco pretrain CONFIG [section.key=value ...]`` does, and return the summary.

    ``config`` is a shipped preset's name (``moco.shipped_configs()``), a YAML path or a
    `Config`; ``options`` are ``section__key=value`` overrides.
    ``resume=True`` continues ``train.output_dir/checkpoint_last.pth`` (or give a checkpoint path);
    ``overwrite=True`` replaces a finished run there. Without either, a directory that holds a run is
    refused, so no result is lost by accident. Interrupting (Ctrl-C) saves a resumable checkpoint."""
    from moco.train import pretrain as train

    resolved = load_config(config, **options)
    resume_from = "auto" if resume is True else (os.fspath(resume) if resume else None)
    return _summary(train(resolved, resume=resume_from, overwrite=overwrite))


def _summary(result: "RunResult") -> RunSummary:
    """The loop's result with the content of the ``summary.json`` it wrote."""
    path = Path(result.run_dir) / "summary.json"
    details = json.loads(path.read_text()) if path.is_file() else {}
    return RunSummary(Path(result.run_dir), result.test_knn, dict(result.val_knn), result.final_loss,
                      result.seconds, result.checkpoint_error, details)


def export(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], format: str = "torchvision") -> Path:
    """Write a checkpoint's backbone for another library, as ``moco export`` does.

    ``format`` is ``torchvision`` (ResNets), ``timm`` (Vision Transformers) or ``detectron2``
    (ResNets of torchvision's shape); ``output.json`` records how to build the network that loads
    it. Returns ``output``. A format that cannot hold this backbone is refused before anything is
    written (`ExportError`)."""
    from moco.exporters import export_checkpoint

    return export_checkpoint(checkpoint, format, output)
