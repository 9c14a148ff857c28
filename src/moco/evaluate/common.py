"""What every evaluation command shares: the checkpoint, the labelled data, features, and result files.

The data options come from the config stored in our checkpoints (the dataset the encoder was
pretrained on), overridden by ``data.key=value`` arguments; checkpoints without a config (the
reference's) start from the defaults, so their data must be named on the command line.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moco.config import Config, ConfigError, apply_overrides, from_dict
from moco.data.augment import BatchAugment, EvalTransform, preset
from moco.data.datasets import make_loader
from moco.evaluate.knn import extract_features
from moco.pretrained import PretrainedEncoder, load_pretrained
from moco.progress import Progress, file_digest
from moco.data.splits import Data, build_data
from moco.runtime import resolve_device

# Data options that change how images are read, not which images or pixels: left out of a kept row's key.
_READING_ONLY = ("workers", "in_memory_mb", "download", "on_bad_image", "val_size")


@dataclass
class EvalContext:
    """A loaded encoder, the labelled train/test splits, where results go and where progress shows."""

    pretrained: PretrainedEncoder
    config: Config
    data: Data
    device: torch.device
    run_dir: Path
    batch_size: int = 512
    progress: Progress = field(default_factory=Progress.silent)

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What a kept row was computed on: the checkpoint's bytes and the labelled images."""
        data = {k: v for k, v in asdict(self.config.data).items() if k not in _READING_ONLY}
        return {"checkpoint_sha256": file_digest(self.pretrained.path), "data": data,
                "train_images": len(self.data.full_train), "test_images": len(self.data.test)}

    @property
    def preprocess(self) -> EvalTransform:
        return EvalTransform(self.config.data.image_size, self.data.mean, self.data.std)

    def augment(self, crop_scale: Sequence[float]) -> BatchAugment:
        """The protocol's training augmentation: random resized crop and horizontal flip only."""
        spec = preset("none", size=self.config.data.image_size, mean=self.data.mean, std=self.data.std,
                      crop_scale=tuple(crop_scale), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5)
        return BatchAugment(spec)

    def loader(self, dataset: Any, batch_size: int | None = None, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False) -> Any:
        return make_loader(dataset, batch_size or self.batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                           workers=self.config.data.workers)


def make_context(checkpoint: str | os.PathLike, overrides: Sequence[str] = (), output_dir: str | None = None,
                 device: str = "auto", threads: int = 0, batch_size: int = 512,
                 progress: Progress | None = None) -> EvalContext:
    """Load ``checkpoint`` and the labelled data it is evaluated on."""
    if threads:
        torch.set_num_threads(threads)
    pretrained = load_pretrained(checkpoint)
    values = json.loads(json.dumps(pretrained.config)) if pretrained.config else {}
    config = from_dict(apply_overrides(values, list(overrides)))
    # Evaluation trains on the whole labelled train split: no pretraining holdout, no unlabeled split.
    config.data.val_size, config.data.train_split = 0, "train"
    data = build_data(config, pretraining=False)
    if data.full_train is None or data.test is None:
        raise ConfigError(f"data.dataset={config.data.dataset}: evaluation needs labelled train and test splits")
    if data.channels != pretrained.spec.in_channels:
        raise ConfigError(f"{checkpoint}: the encoder takes {pretrained.spec.in_channels}-channel images but "
                          f"{config.data.dataset} has {data.channels}; set data.channels={pretrained.spec.in_channels}")
    run_dir = Path(output_dir) if output_dir else Path(checkpoint).resolve().parent
    run_dir.mkdir(parents=True, exist_ok=True)
    return EvalContext(pretrained, config, data, resolve_device(device), run_dir, batch_size,
                       progress or Progress.silent())


@dataclass
class FeatureSet:
    """Backbone features (raw, not normalised) of the train and test splits, with labels."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    seconds: float = 0.0


def batches_of(ctx: EvalContext, dataset: Any, name: str) -> Any:
    """``dataset``'s evaluation batches, counted as a phase of ``ctx.progress``."""
    return ctx.progress.iterate(ctx.loader(dataset), name, len(dataset))


def extract_feature_set(backbone: nn.Module, ctx: EvalContext, name: str = "features") -> FeatureSet:
    """Run ``backbone`` (head removed, eval mode) once over both splits."""
    tic = time.perf_counter()
    backbone = backbone.to(ctx.device)
    train, train_y = extract_features(backbone, batches_of(ctx, ctx.data.full_train, f"{name}, training split"),
                                      ctx.preprocess, ctx.device, head=True, normalize=False)
    test, test_y = extract_features(backbone, batches_of(ctx, ctx.data.test, f"{name}, test split"),
                                    ctx.preprocess, ctx.device, head=True, normalize=False)
    return FeatureSet(train, train_y, test, test_y, time.perf_counter() - tic)


def features_work(ctx: EvalContext) -> int:
    """Images one pass of :func:`extract_feature_set` sends through the network."""
    return len(ctx.data.full_train) + len(ctx.data.test)


@torch.no_grad()
def time_forward(ctx: EvalContext, backbone: nn.Module | None = None, batches: int = 2) -> float:
    """Seconds per image through the backbone, data loading included, over the first ``batches``
    evaluation batches of the training split (the loader's start-up counted: a conservative rate)."""
    model = (backbone or ctx.pretrained.backbone()).to(ctx.device).eval()
    images, tic = 0, time.perf_counter()
    for number, (x, _, _) in enumerate(ctx.loader(ctx.data.full_train)):
        extract_features(model, [(x, torch.zeros(len(x)), None)], ctx.preprocess, ctx.device, head=True)
        images += len(x)
        if number + 1 >= batches:
            break
    return (time.perf_counter() - tic) / max(1, images)


def pixel_feature_set(ctx: EvalContext) -> FeatureSet:
    """Raw pixels (normalised like the encoder's input) centred on the training mean image."""
    def pixels(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for images, labels, _ in batches_of(ctx, dataset, "raw pixels"):
            xs.append(ctx.preprocess(images).flatten(1))
            ys.append(torch.as_tensor(labels))
        return torch.cat(xs), torch.cat(ys)

    train, train_y = pixels(ctx.data.full_train)
    test, test_y = pixels(ctx.data.test)
    mean = train.mean(0, keepdim=True)
    return FeatureSet(train - mean, train_y, test - mean, test_y)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with two decimals, None as 'n/a'."""
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, name: str, results: dict[str, Any], table: str) -> tuple[Path, Path]:
    """``<run_dir>/<name>.json`` and ``<run_dir>/<name>.md``, each replaced whole (written beside,
    then renamed), so a command stopped while writing leaves the previous version, never half a file."""
    json_path, md_path = run_dir / f"{name}.json", run_dir / f"{name}.md"
    for path, text in ((json_path, json.dumps(results, indent=2) + "\n"), (md_path, table)):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
    return json_path, md_path


def unfinished_note(pending: Sequence[str], what: str = "row") -> str:
    """The markdown's last line while rows are missing: which, and how to finish them."""
    return (f"\n**Unfinished: {len(pending)} {what}{'s' if len(pending) != 1 else ''} still to run "
            f"({', '.join(pending)}); the same command runs them and keeps those above.**\n")


def where(ctx: EvalContext) -> str:
    """The data and machine an evaluation runs on, for its printed plan."""
    d = ctx.config.data
    return (f"{len(ctx.data.full_train):,} training / {len(ctx.data.test):,} test images ({d.dataset}, "
            f"{d.image_size} px), {ctx.device}, {torch.get_num_threads()} thread(s)")


def describe(ctx: EvalContext) -> dict[str, Any]:
    """Provenance recorded with every result: which weights, which data, which machine setting."""
    d = ctx.config.data
    return {"checkpoint": str(ctx.pretrained.path), "checkpoint_kind": ctx.pretrained.source,
            "encoder": ctx.pretrained.spec.to_dict(), "dataset": d.dataset, "image_size": d.image_size,
            "train_images": len(ctx.data.full_train), "test_images": len(ctx.data.test),
            "device": str(ctx.device), "threads": torch.get_num_threads()}
