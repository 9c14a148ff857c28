"""Which feature of a pretrained encoder is "the representation" on a user's folder: kNN on the
validation hold-out (the kNN monitor's split; the test split is not read) for several places and
treatments of the feature, beside centred raw pixels.

For each run directory (``moco pretrain folder ... train.output_dir=RUN``) it reads the run's
checkpoint and prints, at k = 10 and 200 (weighted, T = ``train.knn_t``):

- ``backbone``: global average pool of the last stage, L2-normalised (what export keeps);
- ``backbone, centred``: the same, centred on the bank's mean before normalising (as the pixel
  baseline is);
- ``backbone, clean BN``: BN statistics re-estimated on un-augmented bank images;
- ``layer3`` and ``layer3+4``: earlier and concatenated stages;
- ``head hidden``, ``encoder``: the head's hidden layer and output (the monitor's headline);
- ``pixels, centred``: the evaluation's preprocessing, flattened.

With ``--leave-one-out`` it reads every labelled training image instead (hold-out included) and
classifies each by its neighbours among the others, for the backbone, the encoder output and the
pixels, centred (on colour images also the pixels in gray, BT.601 luma): on a small folder, seven times the hold-out's images, so differences of half a
point mean something (the images were seen by pretraining, without their labels).

    python bench/feature_choice.py /tmp/inv/clipart /tmp/inv/stamps
    python bench/feature_choice.py --leave-one-out /tmp/inv/digits
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco.config import from_dict
from moco.data.augment import EvalTransform
from moco.data.datasets import LUMA_601, make_loader
from moco.data.splits import build_data
from moco.evaluate.knn import centre_on_bank, knn_predict_many, topk_accuracy
from moco.pretrained import load_pretrained

KS = (10, 200)


def batches(dataset: Any, preprocess: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(preprocess(images), torch.as_tensor(labels))
            for images, labels, _ in make_loader(dataset, 256, shuffle=False, drop_last=False, workers=0)]


@torch.no_grad()
def stages(encoder: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled layer3 and layer4, the head's hidden layer and output of a torchvision-style ResNet."""
    e = encoder
    x = e.maxpool(e.relu(e.bn1(e.conv1(images))))
    x = e.layer2(e.layer1(x))
    l3 = e.layer3(x)
    l4 = e.layer4(l3)
    pooled = torch.flatten(e.avgpool(l4), 1)
    out = {"layer3": l3.mean((2, 3)), "backbone": pooled}
    head = e.fc
    if isinstance(head, nn.Sequential):
        hidden = head[:-1](pooled)
        out["head hidden"] = hidden
        out["encoder"] = head[-1](hidden)
    else:
        out["encoder"] = head(pooled)
    return out


def features(encoder: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    encoder.eval()
    parts = [stages(encoder, x) for x, _ in data]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, torch.cat([y for _, y in data])


@torch.no_grad()
def clean_bn(encoder: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """A copy whose BN running statistics are the plain average over un-augmented images."""
    model = copy.deepcopy(encoder)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x, _ in data:
        model(x)
    return model.eval()


def knn(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor, classes: int,
        t: float, centre: bool = False) -> dict[int, float]:
    if centre:
        bank, query = centre_on_bank(bank, query)
    scores = knn_predict_many(F.normalize(bank, dim=1), bank_y, F.normalize(query, dim=1), classes, KS, t)
    return {k: topk_accuracy(s, query_y, ks=(1,))[1] for k, s in scores.items()}


def evaluate_run(run: Path) -> dict[str, dict[int, float]]:
    pretrained = load_pretrained(run / "checkpoint_last.pth")
    config = from_dict(pretrained.config)
    data = build_data(config, pretraining=False)
    preprocess = EvalTransform(config.data.image_size, data.mean, data.std)
    bank, val = batches(data.monitor_bank, preprocess), batches(data.val, preprocess)
    classes, t = data.num_classes, config.train.knn_t
    encoder = pretrained.encoder().eval()
    rows: dict[str, dict[int, float]] = {}
    for label, model in (("", encoder), (", clean BN", clean_bn(encoder, bank))):
        fb, yb = features(model, bank)
        fv, yv = features(model, val)
        for name in fb:
            rows[name + label] = knn(fb[name], yb, fv[name], yv, classes, t)
            rows[name + label + ", centred"] = knn(fb[name], yb, fv[name], yv, classes, t, centre=True)
        both = lambda f: torch.cat([F.normalize(f["layer3"], dim=1), F.normalize(f["backbone"], dim=1)], 1)  # noqa: E731
        rows["layer3+4" + label] = knn(both(fb), yb, both(fv), yv, classes, t)
    pixels_b = torch.cat([x.flatten(1) for x, _ in bank])
    pixels_v = torch.cat([x.flatten(1) for x, _ in val])
    rows["pixels, centred"] = knn(pixels_b, torch.cat([y for _, y in bank]), pixels_v,
                                  torch.cat([y for _, y in val]), classes, t, centre=True)
    return rows


def leave_one_out(feats: torch.Tensor, labels: torch.Tensor, classes: int, t: float) -> dict[int, float]:
    """Weighted kNN of each image against all the others, centred on their mean."""
    normed = F.normalize(feats - feats.mean(0, keepdim=True), dim=1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-2.0)  # never its own neighbour
    accuracies = {}
    for k in KS:
        sims, index = similarity.topk(min(k, len(feats) - 1), dim=1)
        votes = torch.zeros(len(feats), classes).scatter_add_(1, labels[index], (sims / t).exp())
        accuracies[k] = (votes.argmax(1) == labels).float().mean().item() * 100
    return accuracies


def evaluate_run_leave_one_out(run: Path) -> dict[str, dict[int, float]]:
    pretrained = load_pretrained(run / "checkpoint_last.pth")
    config = from_dict(pretrained.config)
    data = build_data(config, pretraining=False)
    labelled = batches(data.full_train, EvalTransform(config.data.image_size, data.mean, data.std))
    feats, labels = features(pretrained.encoder().eval(), labelled)
    classes, t = data.num_classes, config.train.knn_t
    pixels = torch.cat([x.flatten(1) for x, _ in labelled])
    rows = {"backbone, centred": leave_one_out(feats["backbone"], labels, classes, t),
            "encoder, centred": leave_one_out(feats["encoder"], labels, classes, t),
            "pixels, centred": leave_one_out(pixels, labels, classes, t)}
    if data.channels == 3:  # whether colour is what tells the classes apart: the same pixels in gray
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))
        luma = torch.tensor(LUMA_601).view(1, 3, 1, 1)
        gray = torch.cat([((x * std + mean) * luma).sum(1).flatten(1) for x, _ in labelled])
        rows["gray pixels, centred"] = leave_one_out(gray, labels, classes, t)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--leave-one-out", action="store_true",
                        help="every labelled training image against the others, instead of the hold-out")
    args = parser.parse_args()
    evaluate = evaluate_run_leave_one_out if args.leave_one_out else evaluate_run
    run_names = [run.name for run in args.runs]
    results = {(run.name if run_names.count(run.name) == 1 else str(run)): evaluate(run) for run in args.runs}
    names = list(next(iter(results.values())))
    print("| feature | " + " | ".join(f"{r} k10 / k200" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[r][name][10]:.1f} / {results[r][name][200]:.1f}"
                                         for r in results) + " |")


if __name__ == "__main__":
    main()
