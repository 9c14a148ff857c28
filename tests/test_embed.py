"""`moco embed` and `moco search`: features of a folder, the look-up, near-duplicates."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.cli import main
from moco.embed import Embeddings, duplicate_groups, embed, nearest
from tests.eval_helpers import save_tiny_moco_checkpoint


def _pattern(kind: int, size: int = 40) -> np.ndarray:
    """Clearly different images: bars at different angles and places, a disc, a checkerboard."""
    y, x = np.mgrid[:size, :size]
    patterns = [x < size // 3, y < size // 3, (x + y) % 16 < 8, (x - size / 2) ** 2 + (y - size / 2) ** 2 < 90,
                ((x // 5) + (y // 5)) % 2 == 0, np.abs(x - y) < 4]
    return (np.stack([patterns[kind]] * 3, axis=-1) * 220 + 20).astype(np.uint8)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for kind in range(6):
        (root / f"class{kind % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pattern(kind)).save(root / f"class{kind % 2}" / f"img{kind}.png")
    shutil.copyfile(root / "class0" / "img2.png", root / "class1" / "copy_of_img2.png")  # the planted duplicate
    return root


def test_embed_then_search_finds_each_image_first_with_similarity_one(tmp_path: Path, folder: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)  # the untrained encoder's weights, so the similarities below are fixed
    checkpoint, _ = save_tiny_moco_checkpoint(tmp_path / "ckpt")
    command = ["embed", str(checkpoint), str(folder), "--out", str(tmp_path / "emb.npz"), "--workers", "0",
               "--batch-size", "2"]
    assert main(command) == 0
    err = capsys.readouterr().err  # what it embeds, then (off a terminal) the estimate from the first batch
    assert err.startswith(f"embedding 7 images of {folder} with the backbone of {checkpoint} on cpu, batches of 2\n")
    assert "embedding: 7 images, about " in err and "(measured on the first 2)" in err and "\r" not in err
    assert main(command) == 2  # a finished file is replaced only when asked
    assert capsys.readouterr().err == f"moco: error: --output {tmp_path / 'emb.npz'} exists; --overwrite replaces it\n"
    assert main([*command, "--overwrite"]) == 0
    index = Embeddings.load(tmp_path / "emb.npz")
    assert len(index.paths) == 7 and index.paths[0] == "class0/img0.png" and index.classes == ["class0", "class1"]
    torch.testing.assert_close(index.features.norm(dim=1), torch.ones(7))
    assert index.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    scores, ids = nearest(index.features, index.features, k=3)
    assert all(j == i or {i, j} == {1, 3} for i, j in enumerate(ids[:, 0].tolist()))  # itself, or its exact copy
    torch.testing.assert_close(scores[:, 0], torch.ones(7))
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert main(["search", "--index", str(tmp_path / "emb.npz"), "class0/img0.png", "class1/img1.png", "-k", "4",
                 "--grid", str(grid)]) == 0
    table = capsys.readouterr().out
    assert "| class0/img0.png | 1 | 1.0000 | class0/img0.png | class0 |" in table
    assert "| class1/img1.png | 1 | 1.0000 | class1/img1.png | class1 |" in table
    with Image.open(grid) as image:  # two rows of query + 4 neighbours, 1.6 x 1.8 inches per cell at 100 dpi
        assert image.size == (800, 360)
    # A query file outside the index is embedded with the index's checkpoint.
    outside = tmp_path / "outside.png"
    shutil.copyfile(folder / "class0" / "img4.png", outside)
    assert main(["search", "--index", str(tmp_path / "emb.npz"), str(outside), "-k", "1"]) == 0
    assert f"| {outside} | 1 | 1.0000 | class0/img4.png | class0 |" in capsys.readouterr().out


def test_csv_layout_and_dataset_input(tmp_path: Path, folder: Path) -> None:
    torch.manual_seed(0)  # the untrained encoder's weights, so the similarities below are fixed
    checkpoint, _ = save_tiny_moco_checkpoint(tmp_path / "ckpt")
    found = embed(checkpoint, str(folder), feature="encoder", workers=0)
    found.save(tmp_path / "emb.csv", "csv")
    with open(tmp_path / "emb.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "filenames" and rows[0][-1] == "labels" and rows[0][1] == "embedding_0"
    assert len(rows[0]) == 2 + found.features.shape[1] == 2 + 128  # the encoder's output, head included
    assert rows[1][0] == "class0/img0.png" and rows[1][-1] == "0"


def test_a_planted_duplicate_is_found_and_nothing_else(tmp_path: Path, folder: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)  # the untrained encoder's weights, so the similarities below are fixed
    checkpoint, _ = save_tiny_moco_checkpoint(tmp_path / "ckpt")
    found = embed(checkpoint, str(folder), workers=0)
    sims = found.features @ found.features.T
    threshold = 0.9999
    off_diagonal = sims[~torch.eye(7, dtype=torch.bool)]
    assert (off_diagonal >= threshold).sum() == 2  # the pair, both ways: the threshold separates it
    assert duplicate_groups(found.features, threshold) == [[1, 3]]
    out = tmp_path / "dups.json"
    assert main(["search", "--duplicates", str(folder), "--checkpoint", str(checkpoint), "--threshold",
                 str(threshold), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["groups"] == [["class0/img2.png", "class1/copy_of_img2.png"]]
    printed = capsys.readouterr()
    assert "1 group(s) of near-duplicates" in printed.out and printed.err.startswith("embedding 7 images of ")
    assert main(["search", "--duplicates", str(folder), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert f"--output {out} exists; --overwrite replaces it" in capsys.readouterr().err


def test_bad_search_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["search", "--index", str(tmp_path / "missing.npz"), "q.png"]) == 2
    assert "--index:" in capsys.readouterr().err
    assert main(["search", "--duplicates", str(tmp_path)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_a_centred_checkpoint_embeds_centred_features_and_queries_share_the_index_centre(tmp_path: Path,
                                                                                          folder: Path) -> None:
    """train.knn_centre (the folder presets): embed compares as the run's kNN does: features centred
    on the embedded set's mean, then normalised; a query from outside the index gets the index's centre."""
    from moco.embed import query_features
    from moco.pretrained import load_pretrained

    torch.manual_seed(0)
    checkpoint, _ = save_tiny_moco_checkpoint(tmp_path / "ckpt", extra=["train.knn_centre=true"])
    found = embed(checkpoint, str(folder), workers=0)
    plain = embed(save_tiny_moco_checkpoint(tmp_path / "plain")[0], str(folder), workers=0)
    assert plain.centre is None and found.centre is not None
    raw = found.features  # rebuild from the backbone by hand
    from moco.data.augment import EvalTransform
    from moco.data.splits import default_stats
    from moco.evaluate.knn import extract_features
    from moco.data.datasets import make_loader

    pretrained = load_pretrained(checkpoint)
    mean, std = default_stats(pretrained.config["data"]["dataset"], 1)
    by_hand, _ = extract_features(pretrained.backbone(), make_loader(found.dataset, 8, shuffle=False, drop_last=False,
                                                                     workers=0),
                                  EvalTransform(pretrained.config["data"]["image_size"], mean, std), normalize=False)
    torch.testing.assert_close(found.centre, by_hand.mean(0))
    torch.testing.assert_close(raw, torch.nn.functional.normalize(by_hand - by_hand.mean(0), dim=1))
    found.save(tmp_path / "centred.npz")
    index = Embeddings.load(tmp_path / "centred.npz")
    torch.testing.assert_close(index.centre, found.centre)
    outside = tmp_path / "outside.png"
    shutil.copyfile(folder / "class0" / "img0.png", outside)  # the same picture, embedded alone
    query = query_features(index, [str(outside)], str(checkpoint), "cpu")
    torch.testing.assert_close(query[0], index.features[0], atol=1e-5, rtol=1e-5)
