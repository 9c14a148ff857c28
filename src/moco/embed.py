"""The look-up itself: embed images with a pretrained encoder, search them by cosine similarity,
find near-duplicates.

``moco embed CKPT DATA --out emb.npz`` writes L2-normalised features of a folder of images
(streamed from disk, any size) or of a dataset split, with relative paths and labels where the
folder has class sub-folders; ``--format csv`` writes ``filenames, embedding_0..d-1, labels``.
``moco search --index emb.npz QUERY... -k 8`` prints the nearest images and draws a grid;
``moco search --duplicates DIR --threshold 0.95`` groups near-duplicates.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from moco.config import ConfigError, from_dict
from moco.data.augment import EvalTransform
from moco.data.datasets import DATASETS, ImageFolderDataset, load_dataset, make_loader
from moco.data.splits import default_stats
from moco.evaluate.knn import extract_features, faiss_available
from moco.pretrained import load_pretrained
from moco.progress import Progress
from moco.runtime import resolve_device

FEATURES = ("backbone", "encoder")
FAISS_FROM = 100_000  # index rows from which faiss (when installed) replaces the exact torch search


@dataclass
class Embeddings:
    """L2-normalised features (N x D) with where each came from."""

    features: torch.Tensor
    paths: list[str]
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    root: str = ""            # the folder the paths are relative to ("" for a dataset split)
    checkpoint: str = ""
    feature: str = "backbone"
    dataset: Any = None       # where the images are (not saved): thumbnails of in-memory datasets
    centre: torch.Tensor | None = None  # subtracted before normalising (train.knn_centre): queries get the same

    def save(self, path: str | os.PathLike, fmt: str = "npz") -> Path:
        path = Path(path)
        if fmt == "csv":
            with open(path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["filenames", *(f"embedding_{i}" for i in range(self.features.shape[1])), "labels"])
                for name, row, label in zip(self.paths, self.features.tolist(), self.labels.tolist()):
                    writer.writerow([name, *(f"{v:.7g}" for v in row), label])
            return path
        np.savez(path, features=self.features.numpy().astype(np.float32), paths=np.array(self.paths),
                 labels=self.labels.numpy(), classes=np.array(self.classes), root=self.root,
                 checkpoint=self.checkpoint, feature=self.feature,
                 centre=np.zeros(0, np.float32) if self.centre is None else self.centre.numpy().astype(np.float32))
        return saved_path(path, fmt)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Embeddings":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--index: {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
            centre = data["centre"] if "centre" in data.files else np.zeros(0)
            return cls(torch.from_numpy(data["features"]), [str(p) for p in data["paths"]],
                       torch.from_numpy(data["labels"]), [str(c) for c in data["classes"]], str(data["root"]),
                       str(data["checkpoint"]), str(data["feature"]),
                       centre=torch.from_numpy(centre) if centre.size else None)
        except (ValueError, KeyError, OSError) as err:
            raise ConfigError(f"--index: {path} is not an embedding file written by moco embed ({err})") from None


def saved_path(path: str | os.PathLike, fmt: str = "npz") -> Path:
    """Where :meth:`Embeddings.save` writes ``path`` (numpy adds .npz to a name without it)."""
    path = Path(path)
    return path if fmt == "csv" or path.suffix == ".npz" else path.with_name(path.name + ".npz")


def refuse_to_replace(path: Path, option: str, overwrite: bool) -> None:
    """A finished output is replaced only when asked: the error names the file and the option."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{option} {path} exists; --overwrite replaces it")


def _dataset_for(data: str, config: Any, channels: int, workers: int) -> tuple[Any, list[str], str, list[str]]:
    """A folder (any images; class sub-folders give labels) or ``dataset[:split]`` (default test)."""
    image_size = config.data.image_size
    if Path(data).expanduser().is_dir():
        dataset = ImageFolderDataset(data, load_size=image_size, channels=channels, fit="crop")
        root = dataset.root
        paths = [dataset.relative_path(i) for i in range(len(dataset))]
        return dataset, paths, str(root), list(dataset.classes)
    name, _, split = data.partition(":")
    if name not in DATASETS or name == "folder":
        raise ConfigError(f"{data}: neither a folder nor a dataset ({', '.join(d for d in DATASETS if d != 'folder')}"
                          f", optionally with :train or :test)")
    dataset = load_dataset(name, split or "test", config.data.root, False, image_size, channels)
    classes = [str(c) for c in (getattr(dataset, "classes", None) or ())]
    return dataset, [f"{name}:{split or 'test'}/{i}" for i in range(len(dataset))], "", classes


def embed(checkpoint: str | os.PathLike, data: str, feature: str = "backbone", batch_size: int = 256,
          device: str = "auto", workers: int = 2, progress: Progress | None = None,
          centre_on: torch.Tensor | None = None) -> Embeddings:
    """L2-normalised features of ``data`` (a folder or ``dataset[:split]``) from ``checkpoint``'s
    encoder: its backbone, or with ``feature="encoder"`` its output, head included. ``progress``
    says what is embedded and, from the first batch, how long it will take.

    A checkpoint trained with ``train.knn_centre`` (the folder presets) is compared as its kNN
    monitor compares: features centred before normalising, on ``centre_on`` (an index's centre,
    for queries) or else on the mean of the images embedded together."""
    if feature not in FEATURES:
        raise ConfigError(f"--feature: {feature!r} is not one of {', '.join(FEATURES)}")
    pretrained = load_pretrained(checkpoint)
    config = from_dict(dict(pretrained.config or {}))
    channels = pretrained.spec.in_channels
    if pretrained.spec.family == "vit":
        config.data.image_size = pretrained.spec.image_size  # the size its position embedding was built for
    dataset, paths, root, classes = _dataset_for(data, config, channels, workers)
    mean, std = default_stats(config.data.dataset, channels)
    mean, std = tuple(config.data.mean or mean), tuple(config.data.std or std)
    model = pretrained.encoder() if feature == "encoder" else pretrained.backbone()
    target = resolve_device(device)
    progress = progress or Progress.silent()
    progress.say(f"embedding {len(dataset):,} images of {data} with the {feature} of {checkpoint} on {target}, "
                 f"batches of {batch_size}")
    batches = progress.iterate(make_loader(dataset, batch_size, shuffle=False, drop_last=False, workers=workers),
                               "embedding", len(dataset), estimate=True)
    features, labels = extract_features(model.to(target), batches, EvalTransform(config.data.image_size, mean, std),
                                        target, head=True, normalize=False)
    centre = None
    if config.train.knn_centre and len(features):
        centre = centre_on if centre_on is not None else features.mean(0)
        features = features - centre
    return Embeddings(F.normalize(features, dim=1), paths, labels.long(), classes, root, str(checkpoint), feature,
                      dataset, centre)


# --- search -----------------------------------------------------------------------------------------
def nearest(index: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 4096,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity and index of the ``k`` nearest rows of ``index`` for each query (rows
    L2-normalised). Exact in torch, in chunks of queries; faiss's exact inner-product index for
    large indexes when it is installed (``backend="auto"``)."""
    k = min(k, index.shape[0])
    if backend == "faiss" or (backend == "auto" and index.shape[0] >= FAISS_FROM and faiss_available()):
        import faiss

        flat = faiss.IndexFlatIP(index.shape[1])
        flat.add(index.float().numpy())
        scores, ids = flat.search(queries.float().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()
    results = [torch.topk(q @ index.T, k, dim=1) for q in queries.float().split(chunk)]
    return torch.cat([r.values for r in results]), torch.cat([r.indices for r in results])


def duplicate_groups(features: torch.Tensor, threshold: float, chunk: int = 2048) -> list[list[int]]:
    """Groups of rows whose cosine similarity reaches ``threshold`` (connected through such pairs)."""
    parent = list(range(features.shape[0]))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, features.shape[0], chunk):
        sims = features[start:start + chunk] @ features.T
        rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
        for i, j in zip((rows + start).tolist(), cols.tolist()):
            if i < j:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(features.shape[0]):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def search_table(index: Embeddings, query_names: Sequence[str], scores: torch.Tensor, ids: torch.Tensor) -> str:
    """A markdown table: each query's neighbours, best first, with similarity and label."""
    lines = ["| query | rank | similarity | image | label |", "|---|---|---|---|---|"]
    for q, name in enumerate(query_names):
        for rank, (score, i) in enumerate(zip(scores[q].tolist(), ids[q].tolist()), start=1):
            label = int(index.labels[i])
            label_name = index.classes[label] if 0 <= label < len(index.classes) else ("-" if label < 0 else label)
            lines.append(f"| {name} | {rank} | {score:.4f} | {index.paths[i]} | {label_name} |")
    return "\n".join(lines) + "\n"


def load_thumbnail(index: Embeddings, i: int, size: int = 96) -> np.ndarray:
    """An RGB thumbnail of image ``i`` of the index (its file, or its in-memory pixels)."""
    from PIL import Image

    if index.root:
        return thumbnail_of_file(Path(index.root) / index.paths[i], size)
    if index.dataset is None:
        return np.zeros((size, size, 3), dtype=np.uint8)
    pixels = index.dataset[i][0].numpy()  # uint8 C x H x W
    rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels
    return _thumbnail(Image.fromarray(rgb.transpose(1, 2, 0)), size)


def thumbnail_of_file(path: str | os.PathLike, size: int = 96) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as opened:
        return _thumbnail(opened.convert("RGB"), size)


def _thumbnail(image: Any, size: int) -> np.ndarray:
    """``size`` pixels on the long side; small images are enlarged without blurring (28 px stays sharp)."""
    from PIL import Image

    scale = size / max(image.size)
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    return np.asarray(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample))


def neighbour_grid(queries: Sequence[np.ndarray], query_names: Sequence[str], index: Embeddings,
                   scores: torch.Tensor, ids: torch.Tensor, out: str | os.PathLike) -> Path:
    """A PNG: one row per query, the query first, then its neighbours with their similarities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(queries), ids.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(queries[r])
        axes[r][0].set_title(f"query\n{Path(query_names[r]).name[:18]}", fontsize=7)
        for c in range(1, cols):
            i = int(ids[r][c - 1])
            axes[r][c].imshow(load_thumbnail(index, i))
            axes[r][c].set_title(f"{float(scores[r][c - 1]):.3f}\n{Path(index.paths[i]).name[:18]}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("nearest neighbours by cosine similarity (query, then best first)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def embed_files(checkpoint: str, files: Sequence[str], feature: str, device: str = "auto",
                centre_on: torch.Tensor | None = None) -> torch.Tensor:
    """Embed individual image files (the queries) with the checkpoint that built the index, centred
    on the index's centre when it has one."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for i, file in enumerate(files):
            if not Path(file).is_file():
                raise ConfigError(f"query {file} is not a file in the index nor an image file")
            name = f"{i:06d}{Path(file).suffix.lower()}"
            shutil.copyfile(file, Path(tmp) / name)
            names.append(name)
        found = embed(checkpoint, tmp, feature, device=device, workers=0, centre_on=centre_on)
        if len(found.paths) != len(files):
            raise ConfigError(f"some queries are not readable images: {', '.join(files)}")
        return found.features[[found.paths.index(n) for n in names]]


def query_features(index: Embeddings, queries: Sequence[str], checkpoint: str | None, device: str) -> torch.Tensor:
    """Each query's feature: its row when it is a path of the index, else its file, embedded."""
    rows = {p: i for i, p in enumerate(index.paths)}
    known = [rows.get(q, rows.get(_relative(q, index.root))) for q in queries]
    if all(i is not None for i in known):
        return index.features[known]
    ckpt = checkpoint or index.checkpoint
    if not ckpt or not Path(ckpt).is_file():
        raise ConfigError("queries outside the index need the checkpoint that built it (--checkpoint)")
    new = embed_files(ckpt, [q for q, i in zip(queries, known) if i is None], index.feature, device, index.centre)
    out, fresh = [], iter(new)
    for i in known:
        out.append(index.features[i] if i is not None else next(fresh))
    return torch.stack(out)


def _relative(path: str, root: str) -> str | None:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve())) if root else None
    except ValueError:
        return None
