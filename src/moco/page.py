"""One HTML page per run: ``moco page RUN_DIR`` writes ``RUN_DIR/page/index.html`` and its PNGs.

The page opens from disk in any browser, no server: the run's config, its curves (loss, lr, kNN,
the collapse and consistency diagnostics), a t-SNE map (UMAP when ``umap-learn`` is installed) of
held-out embeddings coloured by label, nearest neighbours of random held-out queries, and the
evaluation tables written next to the checkpoint (kNN, linear probe, fine-tuning, report). Runs
on unlabelled folders get the same page without colours or accuracies.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco.config import ConfigError, from_dict
from moco.embed import Embeddings, embed, load_thumbnail, nearest, neighbour_grid
from moco.progress import Progress
from moco.run_log import read_metrics

CURVES = (("loss", "pretraining loss"), ("lr", "learning rate"), ("pretext_acc", "pretext accuracy (%)"))
DIAGNOSTICS = (("feature_std", "feature std (≈1 spread, 0 collapsed)"), ("mean_cosine", "mean pairwise cosine"),
               ("uniformity", "uniformity (lower: more uniform)"), ("alignment", "alignment (lower: closer positives)"),
               ("queue_age", "queue's mean age (steps)"), ("momentum_drift", "key encoder drift ||θk−θq||/||θq||"))
TABLES = ("report.md", "knn.md", "lincls.md", "finetune.md")


def _plot_series(rows: list[dict[str, Any]], series: tuple[tuple[str, str], ...], title: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(key, label) for key, label in series if any(key in r for r in rows)]
    if not present:
        return None
    cols = min(3, len(present))
    rows_of_plots = -(-len(present) // cols)
    fig, axes = plt.subplots(rows_of_plots, cols, figsize=(4.2 * cols, 3.0 * rows_of_plots), squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=0.9, label=key)
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _plot_knn(rows: list[dict[str, Any]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in rows if r.get("kind") == "epoch" and "val_knn_top1" in r]
    probed = [r for r in rows if r.get("kind") == "epoch" and "online_probe_acc" in r]
    if not epochs and not probed:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("val_knn_top1_backbone", "kNN, backbone"), ("val_knn_top1_encoder", "kNN, encoder output")):
        if epochs:
            ax.plot([r["epoch"] for r in epochs], [r.get(key, r["val_knn_top1"]) for r in epochs], "o-", label=label)
    if probed:
        ax.plot([r["epoch"] for r in probed], [r["online_probe_acc"] for r in probed], "s-", label="online linear probe")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="monitors on held-out images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def map_2d(features: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the features: UMAP when installed, else scikit-learn's t-SNE."""
    x = features.float().numpy()
    try:
        import umap  # type: ignore[import-not-found]

        return umap.UMAP(random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return TSNE(init="pca", perplexity=perplexity, random_state=seed).fit_transform(x), "t-SNE"


def _plot_map(found: Embeddings, out: Path, points: int, seed: int) -> tuple[Path, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = torch.randperm(len(found.paths), generator=torch.Generator().manual_seed(seed))[:points]
    coords, method = map_2d(found.features[pick], seed)
    labels = found.labels[pick].numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if (labels >= 0).any():
        for label in sorted(set(labels.tolist())):
            name = found.classes[label] if 0 <= label < len(found.classes) else str(label)
            mask = labels == label
            ax.scatter(coords[mask, 0], coords[mask, 1], s=5, label=name, color=f"C{label % 10}")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=5, color="C0")
    ax.set(title=f"{method} of {len(pick)} held-out embeddings" + (" by label" if (labels >= 0).any() else ""),
           xlabel=f"{method} 1", ylabel=f"{method} 2")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out, method


def markdown_to_html(text: str) -> str:
    """Pipe tables to <table>, other lines to paragraphs (what the evaluation tools write)."""
    out, table = [], []

    def flush() -> None:
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|?[\s|:-]+\|?", r)]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line.lstrip('#').strip())}</p>")
    flush()
    return "\n".join(out)


def _held_out(config: Any) -> str:
    """What to map: the test split of a dataset, or of an image folder (its training folder when
    it has no test/)."""
    d = config.data
    if d.dataset != "folder":
        return f"{d.dataset}:test"
    root = Path(d.root or ".")
    return str(root / "test") if (root / "test").is_dir() else str(root / d.train_split if (root / d.train_split).is_dir()
                                                                     else root)


def write_page(run_dir: str | Path, checkpoint: str | Path | None = None, points: int = 1500, queries: int = 6,
               neighbours: int = 6, seed: int = 0, device: str = "auto", progress: Progress | None = None) -> Path:
    """Write ``run_dir/page/index.html`` and the PNGs it shows; returns the page's path.
    ``progress`` shows each part: curves, embedding (with its estimate), the map, the neighbours."""
    progress = progress or Progress.silent()
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    ckpt = Path(checkpoint) if checkpoint else run_dir / "checkpoint_last.pth"
    out = run_dir / "page"
    out.mkdir(exist_ok=True)
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r.get("kind") == "train"]
    progress.say(f"page for {run_dir}: curves of {len(rows):,} logged rows"
                 + (f", a map of {points:,} embedded held-out images and {queries} queries' neighbours from {ckpt}"
                    if ckpt.is_file() else f" ({ckpt} not found: no map)"))
    with progress.phase("curves", 3, "figure") as phase:
        figures = []
        for draw in (lambda: _plot_series(train_rows, CURVES, "training", out / "curves.png"),
                     lambda: _plot_knn(rows, out / "knn.png"),
                     lambda: _plot_series(train_rows, DIAGNOSTICS, "collapse and consistency diagnostics",
                                          out / "diagnostics.png")):
            figures.append(draw())
            phase.update()
    sections = ['<h2>Curves</h2>' + "".join(f'<img src="{f.name}" alt="{f.stem}">' for f in figures if f)]
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    if ckpt.is_file():
        from moco.pretrained import load_pretrained

        config = from_dict(dict(load_pretrained(ckpt).config or {}))
        found = embed(ckpt, _held_out(config), device=device, workers=0, progress=progress)
        with progress.phase(f"2-D map of {min(points, len(found.paths)):,} embeddings", 1, "map") as phase:
            map_png, method = _plot_map(found, out / "map.png", points, seed)
            phase.update()
        with progress.phase("neighbours", 1, "grid") as phase:
            pick = torch.randperm(len(found.paths), generator=torch.Generator().manual_seed(seed + 1))[:queries]
            scores, ids = nearest(found.features, found.features[pick], neighbours + 1)
            grid = neighbour_grid([load_thumbnail(found, int(i)) for i in pick], [found.paths[int(i)] for i in pick],
                                  found, scores[:, 1:], ids[:, 1:], out / "neighbours.png")
            phase.update()
        sections.append(f'<h2>Embeddings ({method})</h2><img src="{map_png.name}" alt="map">'
                        f'<h2>Nearest neighbours of random held-out images</h2><img src="{grid.name}" alt="neighbours">')
    tables = [name for name in TABLES if (ckpt.parent / name).is_file()]
    if tables:
        sections.append("<h2>Evaluation</h2>" + "".join(
            f"<h3>{name}</h3>" + markdown_to_html((ckpt.parent / name).read_text()) for name in tables))
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    if summary.get("baselines"):
        sections.insert(0, "<h2>Did pretraining pay?</h2>" + markdown_to_html(baselines_table(summary)))
    page = PAGE.format(title=html.escape(str(run_dir)), summary=html.escape(json.dumps(summary, indent=1)),
                       config=html.escape(config_text), sections="\n".join(sections))
    (out / "index.html").write_text(page)
    return out / "index.html"


def baselines_table(summary: dict[str, Any]) -> str:
    """The run's test kNN of the backbone (what export keeps) beside centred raw pixels and the
    untrained encoder, as a markdown table: whether pretraining paid, at a glance."""
    b, centred = summary["baselines"], ", centred" if summary.get("knn_centred") else ""
    own = [summary.get("test_knn_top1_backbone_k10"), summary.get("test_knn_top1_backbone_k200")]
    if own[1] is None:  # a run without the k = 10 figure: its headline k
        own[1] = summary.get("test_knn_top1_backbone")

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    rows = [f"| this run's backbone{centred} | {cell(own[0])} | {cell(own[1])} |",
            f"| centred raw pixels | {cell(b.get('raw_pixels_k10'))} | {cell(b.get('raw_pixels_k200'))} |",
            f"| the same encoder, untrained (backbone{centred}) | | {cell(b.get('random_init_backbone'))} |"]
    return "\n".join(["| test kNN top-1 (%) | k = 10 | k = 200 |", "|---|---|---|", *rows])


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moco run {title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}} img{{max-width:100%;display:block;
margin:0.5em 0}} table{{border-collapse:collapse;margin:0.5em 0}} td,th{{border:1px solid #ccc;padding:2px 6px;
font-size:13px}} pre{{background:#f6f6f6;padding:0.5em;overflow:auto;font-size:12px}}</style></head>
<body><h1>moco run <code>{title}</code></h1>
<h2>Summary</h2><pre>{summary}</pre>
{sections}
<h2>Config</h2><pre>{config}</pre>
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
}});
</script>
</body></html>
"""
