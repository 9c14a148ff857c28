"""Run configuration: typed dataclasses, loaded from YAML plus ``section.key=value`` overrides.

Every key is checked before any work starts: unknown keys get a "did you mean", wrong types and
impossible values are one-line errors that name the option.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from moco.budget import parse_duration
from moco.errors import ConfigError
from moco.methods import METHODS, method_class
from moco.models.vit import VIT_ARCHS, default_patch_size


AUTO = "auto"
# Options that may be ``auto``: derived from the data when a run starts (moco.derive), printed,
# and stored resolved in the run's config.yaml. Any of them set to a value is used as given.
AUTO_OPTIONS = ("data.image_size", "data.pretrain_load_size", "data.channels", "data.val_size", "model.stem_stride",
                "model.small_images",
                "model.K", "model.bn_splits", "optim.batch_size", "optim.epochs", "aug.crop_scale", "aug.blur_p",
                "aug.flip_p", "train.budget")


def is_auto(value: Any) -> bool:
    """Whether an option is left to be derived from the data (``auto``)."""
    return value == AUTO


@dataclass
class ModelConfig:
    arch: str = "resnet18"             # resnet18/34/50/101 | vit_tiny/small/base (moco_v3: a ViT as in the paper)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128]) # ResNet stage widths; torchvision's are [64, 128, 256, 512]
    small_images: bool = True          # 3x3 stem, no max-pool
    stem_stride: int = 1               # small-image stem stride: 2 halves the resolution (wider nets for the same cost)
    dim: int = 128                     # feature dimension C of q and k
    mlp: bool = True                   # MoCo v2 MLP head
    bn_splits: int = 8                 # BN groups in the global batch (split BN); under torchrun, per process: bn_splits / processes
    shuffle_bn: bool = True            # MoCo v1/v2: keys encoded in shuffled BN groups, so BN cannot leak the positive
    K: int = 4096                      # queue size
    m: float = 0.99                    # key-encoder momentum (m at step 0 with m_schedule=cosine)
    m_schedule: str = "constant"       # constant | cosine: m rises to 1 on a half cosine (MoCo v3, BYOL)
    T: float = 0.2                     # softmax temperature
    symmetric: bool = False            # both views as query and key, two InfoNCE terms summed
    patch_size: int = 0                # ViT: side of a patch; 0 = 4 below 64 px (a 7x7 grid at 28), else 16
    stop_grad_conv1: bool = True       # ViT: the random patch projection stays frozen (MoCo v3's stability trick)
    sync_bn: Optional[bool] = None     # several GPU processes: BN over the global batch (SyncBatchNorm); null = the
                                       # method's choice (on: moco_v3, simclr, byol, swav; off: moco, with shuffle BN)
    # The method (moco.methods; its own options in the top-level section of its name, e.g. memory_bank:).
    # Figure 2 of the paper (docs/ablations.md): end_to_end ignores K (K = batch - 1) and m;
    # memory_bank samples K negatives from a bank of one feature per image and ignores m.
    method: str = "moco"               # moco | end_to_end | memory_bank | moco_v3 | simclr | byol | swav


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"     # fashion_mnist | cifar10 | cifar100 | stl10 | folder
    root: Optional[str] = None         # None: the dataset's default place
    download: bool = False             # let torchvision download when files are missing
    train_split: str = "train"         # STL-10: also 'unlabeled' or 'train+unlabeled'; folder: a sub-folder, not test
    image_size: int = 28               # side of the augmented views (and eval images)
    load_size: int = 0                 # image folders: decode + resize to this before cropping; 0 = image_size
    pretrain_load_size: int = 0        # image folders: squeeze whole files to this before pretraining's crops; 0 =
                                       # load_size; auto: what the smallest crop needs, at most the files' shorter side
    channels: int = 0                  # 0: whatever the dataset has
    val_size: int = 5000               # held out from pretraining for the kNN monitor
    train_subset: int = 0              # use a seeded random subset of the training split; 0 = all
    test_subset: int = 0               # likewise for the test split
    workers: int = 2                   # DataLoader workers (image folders only)
    in_memory_mb: int = 2048           # image folders that take at most this much decoded are decoded once, into memory; 0 = never
    mean: Optional[list[float]] = None # per-channel normalisation; None: the dataset's own (ImageNet's for folders)
    std: Optional[list[float]] = None  # likewise; None: the dataset's own
    on_bad_image: str = "skip"         # skip | fail: corrupt/unreadable files in image folders (docs/reliability.md)


@dataclass
class AugConfig:
    preset: str = "v2"                 # v1 | v2 | none; the fields below override the preset
    crop_scale: Optional[list[float]] = None   # [low, high] fractions of the image area; above 1 zooms out
    flip_p: Optional[float] = None     # horizontal flip probability (0 for digits and text)
    rotation: Optional[float] = None   # degrees, +- (0 in the presets)
    jitter_p: Optional[float] = None   # probability of colour jitter
    brightness: Optional[float] = None # colour jitter strengths
    contrast: Optional[float] = None   # colour jitter strengths
    saturation: Optional[float] = None  # colour jitter strengths
    hue: Optional[float] = None        # at most 0.5
    grayscale_p: Optional[float] = None # probability of turning a colour view gray
    blur_p: Optional[float] = None     # probability of Gaussian blur
    blur_sigma: Optional[list[float]] = None  # [low, high] of the Gaussian blur's sigma
    solarize_p: Optional[float] = None # probability of solarisation
    erase_p: Optional[float] = None    # random erasing of one rectangle per view (0 in the presets)
    erase_scale: Optional[list[float]] = None # [low, high] area of the erased rectangle
    erase_ratio: Optional[list[float]] = None # [low, high] aspect ratio of the erased rectangle
    # Multi-crop (Caron et al., 2020; model.method=moco): small low-resolution crops of each image as
    # extra queries against the global views' keys. They take the view settings above, except size and area.
    local_crops: int = 0               # small views per image; 0 = the two global views only
    local_size: int = 0                # their side in pixels; 0 = half of data.image_size
    local_scale: list[float] = field(default_factory=lambda: [0.2, 0.5])  # their crop area, as crop_scale


@dataclass
class OptimConfig:
    epochs: int = 10                   # passes over the pretraining images
    batch_size: int = 256              # global batch (all processes together)
    lr: float = 0.06                   # learning rate at base_batch_size
    base_batch_size: int = 256         # lr is scaled by batch_size / base_batch_size
    optimizer: str = "sgd"             # sgd (MoCo v1/v2) | lars (MoCo v3, ResNet) | adamw (MoCo v3, ViT)
    momentum: float = 0.9              # SGD momentum
    weight_decay: float = 5e-4         # L2 penalty (not on biases and BN for LARS)
    schedule: str = "cosine"           # cosine | step | constant
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # schedule=step: epochs where lr drops
    gamma: float = 0.1                 # schedule=step: the lr's factor at each milestone
    warmup_epochs: float = 0.0         # linear lr warm-up from 0, before the schedule (fractions of an epoch allowed)


@dataclass
class TrainConfig:
    output_dir: str = "runs/moco"      # the run directory: config, metrics, checkpoints, plots, summary
    seed: int = 0                      # seeds the model, the splits and the augmentation
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    precision: str = "auto"            # auto | fp32 | bf16 | fp16
    channels_last: bool = True         # NHWC memory format (faster convolutions on GPUs)
    threads: int = 0                   # CPU threads; 0 = all cores
    log_every: int = 10                # steps between metrics.jsonl / TensorBoard points
    progress: bool = True              # tqdm bar
    tensorboard: bool = True           # also write TensorBoard event files
    knn_every: int = 1                 # epochs between kNN monitor runs on the validation split; 0 = never
    knn_k: int = 200                   # neighbours that vote, in the monitor and the final kNN
    knn_t: float = 0.1                 # temperature of the votes' weights exp(cos / T)
    knn_bank_size: int = 0             # training images in the monitor's feature bank; 0 = all
    knn_feature: str = "backbone"      # backbone (pooled, before the head; what export keeps) | encoder (output, head
                                       # included: the reference CIFAR demo's monitor). The test line reports both.
    knn_centre: bool = False           # centre bank and queries on the bank's mean before the cosine, as the raw-pixel
                                       # baseline is: pooled post-ReLU features share a large common part that
                                       # dominates every cosine (the folder presets: on)
    test_knn: bool = True              # final kNN on the test split
    online_probe: bool = False         # also train a linear classifier on each step's detached backbone features of
                                       # the query view (labelled images only) and score it on the validation split
                                       # at every epoch's end: online_probe_acc (docs/evaluate.md)
    online_probe_lr: float = 1e-3      # the online probe's AdamW lr (no weight decay)
    keep_checkpoints: int = 1          # epoch checkpoints kept besides checkpoint_last.pth
    # Several processes (torchrun; docs/distributed.md):
    dist_timeout_s: float = 600.0      # a collective waiting longer than this (a rank died or hangs) is an error
    debug_sync_checks: bool = False    # every step, check that queue and weights are identical on all ranks
    # Reliability (docs/reliability.md)
    checkpoint_every_steps: int = 0    # also refresh checkpoint_last.pth every N steps (mid-epoch resume); 0 = epoch ends
    on_nonfinite: str = "stop"         # stop | skip: what a NaN/inf loss does
    max_consecutive_skips: int = 10    # on_nonfinite=skip: stop after this many non-finite steps in a row
    on_collapse: str = "warn"          # warn | stop: what collapsed features or a loss back at chance do (moco.diagnostics)
    deterministic: bool = False        # torch.use_deterministic_algorithms + no cuDNN autotuning (for CUDA; CPU already is)
    compile: bool = False              # torch.compile the networks a step runs (minutes of compiling first; for GPUs)
    budget: str = ""                   # wall time for training and evaluation, e.g. 90s, 15m, 2h: sizes optim.epochs=auto
                                       # from a timed probe of the real step (given on the command line, it makes the
                                       # config file's epochs auto unless optim.epochs is given there too); auto: 15m
                                       # on a CPU, none on a GPU (the epochs then follow the images seen)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Each method's own section (moco.methods), by method name: written and read as the top-level
    # section of that name. Holds model.method's section and any other method's that was given.
    methods: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain values, one mapping per section (what ``config.yaml`` holds)."""
        values = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "methods"}
        return {**values, **{name: dataclasses.asdict(options) for name, options in self.methods.items()
                             if dataclasses.fields(options)}}  # sections without options are left out

    def method_options(self) -> Any:
        """The selected method's own section."""
        return self.methods[self.model.method]

    def local_view_size(self) -> int:
        """Multi-crop's small views' side: ``aug.local_size``, or half the global view (at least 8 px)."""
        return self.aug.local_size or max(8, self.data.image_size // 2)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101", *VIT_ARCHS),
    "model.method": tuple(METHODS),
    "model.m_schedule": ("constant", "cosine"),
    "data.dataset": ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder"),
    "aug.preset": ("v1", "v2", "none"),
    "optim.schedule": ("cosine", "step", "constant"),
    "optim.optimizer": ("sgd", "lars", "adamw"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "data.on_bad_image": ("skip", "fail"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.on_collapse": ("warn", "stop"),
    "train.knn_feature": ("backbone", "encoder"),
}


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(name, value, args[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot or sign) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation in (int, str, bool) and not (isinstance(value, annotation) and not
                                                (annotation is int and isinstance(value, bool))):
        raise ConfigError(f"{name}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is Config:  # the methods' own sections sit beside the fixed ones
        return _build_config(values or {}, names)
    kwargs = {}
    for key, value in (values or {}).items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown option {full}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of options, got {value!r}")
            kwargs[key] = _build(hints[key], value, f"{full}.")
        elif value == AUTO and full in AUTO_OPTIONS:
            kwargs[key] = AUTO
        else:
            kwargs[key] = _check_type(full, value, hints[key])
    return cls(**kwargs)


def _build_config(values: dict[str, Any], names: list[str]) -> Config:
    """The fixed sections, then each method's own section (``moco.methods``); model.method's
    section is always present, with its defaults where the file has none."""
    sections = [n for n in names if n != "methods"] + list(METHODS)
    unknown = [key for key in values if key not in sections]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sections, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; valid sections: {', '.join(sections)}"
        raise ConfigError(f"unknown option {unknown[0]}{hint}")
    fixed = _build_fixed(Config, {k: v for k, v in values.items() if k in names and k != "methods"})
    for name in METHODS:
        if name in values:
            if not isinstance(values[name], dict):
                raise ConfigError(f"{name}: expected a mapping of options, got {values[name]!r}")
            fixed.methods[name] = _build(METHODS[name].Options, values[name], f"{name}.")
    if fixed.model.method in METHODS and fixed.model.method not in fixed.methods:
        fixed.methods[fixed.model.method] = METHODS[fixed.model.method].Options()
    return fixed


def _build_fixed(cls: type, values: dict[str, Any]) -> Any:
    """:func:`_build` of the sections every run has."""
    hints = typing.get_type_hints(cls)
    kwargs = {key: _build(hints[key], value, f"{key}.") if isinstance(value, dict) else value
              for key, value in values.items()}
    for key, value in kwargs.items():
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"{key}: expected a mapping of options, got {value!r}")
    return cls(**kwargs)


# Options that moved into a method's own section: old configs (and checkpoints) still load.
MOVED_OPTIONS = {"model.bank_momentum": "memory_bank.momentum", "model.bank_proximal": "memory_bank.proximal"}


def upgrade_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with options that moved (``MOVED_OPTIONS``) at their new place."""
    values = copy.deepcopy(values)
    for old, new in MOVED_OPTIONS.items():
        section, key = old.split(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            value = values[section].pop(key)
            new_section, new_key = new.split(".")
            values.setdefault(new_section, {}).setdefault(new_key, value)
    return values


def from_dict(values: dict[str, Any]) -> Config:
    """A validated config from nested sections (defaults fill what is missing; old option names are moved)."""
    config = _build(Config, upgrade_legacy(values or {}), "")
    validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.1`` -> (['optim', 'lr'], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config's raw sections, before defaults and checks (an empty file is an empty dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return values


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides (values parsed as YAML), then validated."""
    values = read_config_file(path) if path is not None else {}
    given = dict(text.split("=", 1) for text in overrides if "=" in text)
    if given.get("train.budget", "").strip() and "optim.epochs" not in given:  # the budget sizes the run
        overrides = [*overrides, f"optim.epochs={AUTO}"]
    return from_dict(apply_overrides(values, overrides))


def apply_overrides(values: dict[str, Any], overrides: list[str] = ()) -> dict[str, Any]:
    """Set each ``section.key=value`` override in the nested dict ``values`` (in place) and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return values


def auto_options(config: Config) -> list[str]:
    """The options still set to ``auto`` (resolved from the data when a run starts)."""
    flat = {f"{section}.{k}": v for section, d in config.to_dict().items() for k, v in d.items()}
    return [key for key in AUTO_OPTIONS if is_auto(flat[key])]


def validate(config: Config) -> None:
    """Value checks that types alone cannot express. Checks that involve an ``auto`` option are
    made once the data has resolved it (``moco.derive``)."""
    flat = {f"{section}.{k}": v for section, d in config.to_dict().items() for k, v in d.items()}
    for key, options in CHOICES.items():
        if flat[key] not in options:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(options)}")
    pending = set(auto_options(config))
    if pending:
        _validate_resolvable(config, pending)
        return
    m, o, d, t = config.model, config.optim, config.data, config.train
    checks = [
        (0.0 <= m.m <= 1.0, "model.m", f"momentum must lie in [0, 1], got {m.m}"),
        (m.T > 0, "model.T", f"temperature must be > 0, got {m.T}"),
        (m.K > 0, "model.K", f"queue size must be > 0, got {m.K}"),
        (m.dim > 0, "model.dim", f"must be > 0, got {m.dim}"),
        (m.stem_stride in (1, 2), "model.stem_stride", f"must be 1 or 2, got {m.stem_stride}"),
        (m.bn_splits >= 1, "model.bn_splits", f"must be >= 1, got {m.bn_splits}"),
        (len(m.widths) == 4 and all(w > 0 for w in m.widths), "model.widths", f"need four positive widths, got {m.widths}"),
        (o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}"),
        (o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}"),
        (o.batch_size >= 2, "optim.batch_size", f"must be >= 2, got {o.batch_size}"),
        (o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}"),
        (0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs",
         f"must lie in [0, optim.epochs={o.epochs}), got {o.warmup_epochs}: lower it with the epochs"),
        (d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}"),
        (d.load_size == 0 or d.load_size >= d.image_size, "data.load_size", "must be 0 or >= data.image_size"),
        (d.pretrain_load_size == 0 or d.pretrain_load_size >= d.image_size, "data.pretrain_load_size",
         "must be 0 or >= data.image_size"),
        (d.channels in (0, 1, 3), "data.channels", f"must be 0 (from data), 1 or 3, got {d.channels}"),
        (d.val_size >= 0, "data.val_size", f"must be >= 0, got {d.val_size}"),
        (d.in_memory_mb >= 0, "data.in_memory_mb", f"must be >= 0, got {d.in_memory_mb}"),
        (d.train_subset >= 0 and d.test_subset >= 0, "data.train_subset", "subset sizes must be >= 0"),
        (t.knn_k >= 1, "train.knn_k", f"must be >= 1, got {t.knn_k}"),
        (t.knn_t > 0, "train.knn_t", f"must be > 0, got {t.knn_t}"),
        (t.dist_timeout_s > 0, "train.dist_timeout_s", f"must be > 0, got {t.dist_timeout_s}"),
        (m.sync_bn is not True or m.bn_splits == 1, "model.sync_bn", "SyncBatchNorm replaces split BN; set model.bn_splits=1"),
        (t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}"),
        (t.knn_every >= 0, "train.knn_every", f"must be >= 0, got {t.knn_every}"),
        (t.online_probe_lr > 0, "train.online_probe_lr", f"must be > 0, got {t.online_probe_lr}"),
        (t.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0, got {t.keep_checkpoints}"),
        (t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", f"must be >= 0, got {t.checkpoint_every_steps}"),
        (t.max_consecutive_skips >= 1, "train.max_consecutive_skips", f"must be >= 1, got {t.max_consecutive_skips}"),
    ]
    if t.budget and not is_auto(t.budget):
        parse_duration(t.budget)  # a one-line error naming train.budget
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    method_class(m.method).check_config(config)
    if m.arch in VIT_ARCHS:
        patch = m.patch_size or default_patch_size(d.image_size)
        if m.patch_size < 0 or d.image_size % patch:
            raise ConfigError(f"model.patch_size: data.image_size={d.image_size} must be a multiple of the patch size "
                              f"({patch}); e.g. model.patch_size={default_patch_size(d.image_size)}")
    _validate_train_split(d)
    _validate_augmentation(config.aug)
    if config.aug.local_crops and not method_class(m.method).supports_local_views:
        offered = " and ".join(name for name, method in METHODS.items() if method.supports_local_views)
        raise ConfigError(f"aug.local_crops: multi-crop is implemented for model.method={offered} only, not {m.method}")
    if o.batch_size % m.bn_splits:
        raise ConfigError(f"model.bn_splits: {m.bn_splits} must divide optim.batch_size={o.batch_size}")


def _validate_resolvable(config: Config, pending: set[str]) -> None:
    """Validate a config with ``auto`` options: every check on a copy in which each ``auto``
    holds a value that passes on its own, so errors in the options that are set still show
    before any data is read."""
    probe = copy.deepcopy(config)
    placeholders = {"data.image_size": 32, "data.pretrain_load_size": 0, "data.channels": 0, "data.val_size": 0,
                    "model.stem_stride": 1,
                    "model.small_images": True, "optim.epochs": max(2, int(config.optim.warmup_epochs) + 1),
                    "aug.crop_scale": [0.2, 1.0], "aug.blur_p": 0.5, "aug.flip_p": 0.5, "train.budget": ""}
    for key, value in placeholders.items():
        if key in pending:
            section, name = key.split(".")
            setattr(getattr(probe, section), name, value)
    if "model.bn_splits" in pending:
        probe.model.bn_splits = 1
    if "optim.batch_size" in pending:
        probe.optim.batch_size = 2 * probe.model.bn_splits
    if {"model.K", "optim.batch_size"} & pending:  # K is checked against the batch once both are known
        probe.model.K = probe.optim.batch_size * (2 if probe.model.symmetric else 1)
    validate(probe)


TRAIN_SPLITS: dict[str, tuple[str, ...]] = {  # what each dataset may pretrain on; never its test split
    "fashion_mnist": ("train",), "cifar10": ("train",), "cifar100": ("train",),
    "stl10": ("train", "unlabeled", "train+unlabeled"),
}


def _validate_train_split(d: DataConfig) -> None:
    """A split the dataset has and that is not its test split (torchvision's CIFAR reads any
    name but 'train' as the test split, so a typo would pretrain on the test images)."""
    if d.dataset == "folder":
        if d.train_split == "test":
            raise ConfigError("data.train_split: 'test' is the test split of data.dataset=folder; "
                              "name another sub-folder of data.root (e.g. train)")
        return
    allowed = TRAIN_SPLITS[d.dataset]
    if d.train_split not in allowed:
        raise ConfigError(f"data.train_split: {d.train_split!r} is not one of {', '.join(allowed)} "
                          f"for data.dataset={d.dataset}")


def _validate_augmentation(aug: AugConfig) -> None:
    """Probabilities in [0, 1], strengths >= 0, (low, high) ranges in order; unset fields keep the preset's."""
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "erase_p"):
        value = getattr(aug, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"aug.{name}: a probability must lie in [0, 1], got {value}")
    for name in ("brightness", "contrast", "saturation", "hue", "rotation"):
        value = getattr(aug, name)
        if value is not None and value < 0:
            raise ConfigError(f"aug.{name}: must be >= 0, got {value}")
    if aug.hue is not None and aug.hue > 0.5:
        raise ConfigError(f"aug.hue: must lie in [0, 0.5], got {aug.hue}")
    if aug.local_crops < 0 or aug.local_size < 0:
        raise ConfigError(f"aug.local_crops / aug.local_size: must be >= 0, got {aug.local_crops} / {aug.local_size}")
    if 0 < aug.local_size < 8:
        raise ConfigError(f"aug.local_size: {aug.local_size} px is too small for a ResNet; use >= 8 (0 = half the image)")
    ranges = {"crop_scale": (0.0, 4.0), "blur_sigma": (0.0, float("inf")), "erase_scale": (0.0, 1.0),
              "erase_ratio": (0.0, float("inf")), "local_scale": (0.0, 4.0)}
    for name, (low, high) in ranges.items():
        value = getattr(aug, name)
        if value is None:
            continue
        if len(value) != 2 or not low < value[0] <= value[1] <= high:
            raise ConfigError(f"aug.{name}: expected [low, high] with {low:g} < low <= high <= {high:g}, got {value}")


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML, every option spelled out, in the order of the dataclasses."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
