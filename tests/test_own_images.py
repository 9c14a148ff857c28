"""Your own images: options derived from the folder (``auto``), whole-image crops, the queue bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.cli import resolve_config_path
from moco.config import ConfigError, auto_options, load_config
from moco.data.augment import preset, random_resized_crop_flip
from moco.data.datasets import ImageFolderDataset, TensorImageDataset, aspect_ratios_of, into_memory, whole_images
from moco.derive import (MIRROR_GAP, DataFacts, check_queue_fits, derive_data_options,
                         derive_training_options, flip_choice, mirror_gap, pretrain_load_size_for)
from moco.data.splits import build_data

CPU = torch.device("cpu")


def _folder(root: Path, per_class: tuple[int, ...], size: tuple[int, int] = (300, 300), mode: str = "L",
            test: int = 0) -> Path:
    """``root/train/<class>/*.png`` (and ``root/test``) of random pixels, ``per_class`` images per class."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", per_class), ("test", (test,) * len(per_class) if test else ())):
        for label, count in enumerate(counts):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / f"{i}.png")
    return root


def test_the_folder_preset_resolves_to_a_valid_config_on_300_gray_images(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", (150, 90, 40, 20), test=5)  # 300 gray 300x300 images, 4 imbalanced classes
    config = load_config(resolve_config_path("folder"), [f"data.root={root}", "data.workers=0"])
    assert "model.K" in auto_options(config) and "data.val_size" in auto_options(config)
    data = build_data(config)
    assert auto_options(config) == []  # build_data resolved every auto and validated the result
    d, m, o = config.data, config.model, config.optim
    assert (d.channels, d.image_size, m.stem_stride) == (1, 64, 2)
    assert config.aug.crop_scale == [0.2, 1.0] and config.aug.blur_p == 0.5  # MoCo v2's for large images
    assert config.aug.flip_p == 0.5  # noise is as like itself mirrored as not
    assert d.val_size == 60 and len(data.val) == 60 and len(data.pretrain) == 240  # a fifth of a small set
    assert o.batch_size == 16 and m.bn_splits == 1  # 240 / 8 -> 16, groups of >= 16 images
    assert m.K % o.batch_size == 0 and m.K <= len(data.pretrain) // 2
    assert config.train.budget == "15m" and "train.budget=15m" in " ".join(data.derived)  # a CPU run is sized by time
    assert any(note.startswith("model.K=") for note in data.derived)
    image, _, _ = data.pretrain[0]
    assert image.shape == (1, 64, 64)


def _oriented_strokes(count: int, seed: int) -> torch.Tensor:
    """Gamma shapes (a vertical bar and a top bar running right from it) at random places and sizes:
    every one faces the same way, as digits and letters do."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, 32, 32, dtype=torch.uint8)
    for image in images:
        left, top = (int(v) for v in torch.randint(2, 12, (2,), generator=g))
        length = int(torch.randint(10, 18, (1,), generator=g))
        image[0, top:top + length, left:left + 3] = 255
        image[0, top:top + 3, left:left + length] = 255
    return images


def test_flips_are_derived_off_for_data_a_mirror_does_not_map_onto_itself() -> None:
    strokes = _oriented_strokes(200, 0)
    symmetric = torch.cat([strokes[:100], strokes[:100].flip(-1)])  # every mirror image is in the data too
    assert mirror_gap(strokes) > MIRROR_GAP > 0.02 > mirror_gap(symmetric)
    noise = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    assert abs(mirror_gap(noise)) < 0.02
    config = load_config(resolve_config_path("folder"), [])
    notes = flip_choice(config, (mirror_gap(strokes), len(strokes)))
    assert config.aug.flip_p == 0.0 and "not mirror-symmetric" in notes[0] and "median of 200" in notes[0]
    config = load_config(resolve_config_path("folder"), [])
    flip_choice(config, (mirror_gap(symmetric), len(symmetric)))
    assert config.aug.flip_p == 0.5
    config = load_config(resolve_config_path("folder"), ["aug.flip_p=0.3"])
    assert flip_choice(config, (mirror_gap(strokes), len(strokes))) == [] and config.aug.flip_p == 0.3  # set by hand: used as given


def test_under_torchrun_one_rank_decodes_the_flip_sample_and_the_others_take_its_measure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from moco.data import splits

    strokes, decoded = _oriented_strokes(50, 0), []
    monkeypatch.setattr(splits, "sample_images", lambda *args: decoded.append(args) or strokes)
    gathered = []
    monkeypatch.setattr(splits.dist_utils, "all_gather_objects",
                        lambda obj: gathered.append(obj) or [((0.25, 2000), None), obj])
    monkeypatch.setattr(splits.dist_utils, "is_main_process", lambda: False)
    assert splits._mirror_gap_on_one_rank(None, 0, 0) == (0.25, 2000) and decoded == [] and gathered == [(None, None)]
    monkeypatch.setattr(splits.dist_utils, "is_main_process", lambda: True)
    monkeypatch.setattr(splits.dist_utils, "all_gather_objects", lambda obj: [obj, (None, None)])  # rank 0's, rank 1's
    gap, count = splits._mirror_gap_on_one_rank(None, 0, 0)
    assert len(decoded) == 1 and count == 50 and gap == pytest.approx(mirror_gap(strokes))


def test_under_torchrun_rank0_failing_to_measure_the_flip_sample_stops_every_rank(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from moco.data import splits

    def unreadable(*args: object) -> None:
        raise OSError("broken.png: cannot identify image file")

    monkeypatch.setattr(splits, "sample_images", unreadable)
    monkeypatch.setattr(splits.dist_utils, "is_distributed", lambda: True)
    sent = []
    monkeypatch.setattr(splits.dist_utils, "all_gather_objects", lambda obj: sent.append(obj) or [obj, (None, None)])
    monkeypatch.setattr(splits.dist_utils, "is_main_process", lambda: True)
    with pytest.raises(OSError, match="broken.png"):  # rank 0 still takes part in the exchange, then raises its own error
        splits._mirror_gap_on_one_rank(None, 0, 0)
    assert sent == [(None, ("OSError", "broken.png: cannot identify image file"))]
    monkeypatch.setattr(splits.dist_utils, "all_gather_objects", lambda obj: [sent[0], obj])
    monkeypatch.setattr(splits.dist_utils, "is_main_process", lambda: False)
    with pytest.raises(RuntimeError, match="rank 0 could not measure.*OSError: broken.png"):
        splits._mirror_gap_on_one_rank(None, 0, 0)
    # a user's error on rank 0 is the same one-line error on the others
    monkeypatch.setattr(splits.dist_utils, "all_gather_objects",
                        lambda obj: [(None, ("ConfigError", "data.root: no images in /x")), obj])
    with pytest.raises(ConfigError, match=r"^data.root: no images in /x$"):
        splits._mirror_gap_on_one_rank(None, 0, 0)


def test_a_folder_of_oriented_shapes_trains_without_flips_and_says_why(tmp_path: Path) -> None:
    for label in (0, 1):
        folder = tmp_path / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i, image in enumerate(_oriented_strokes(30, label)):
            Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    config = load_config(resolve_config_path("folder"), [f"data.root={tmp_path}", "data.workers=0"])
    data = build_data(config)
    assert config.aug.flip_p == 0.0
    assert any(note.startswith("aug.flip_p=0.0 (mirrored images are") for note in data.derived)


def test_options_set_explicitly_win_over_derived_ones(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", (40, 40))
    config = load_config(resolve_config_path("folder"), [f"data.root={root}", "data.val_size=16", "model.K=32",
                                                         "data.image_size=24", "data.workers=0"])
    data = build_data(config)
    assert (config.data.val_size, config.model.K, config.data.image_size) == (16, 32, 24)
    assert config.optim.batch_size == 16 and 32 % config.optim.batch_size == 0  # the batch fits the given K
    assert not any(note.startswith(("model.K=", "data.val_size=", "data.image_size=")) for note in data.derived)


@pytest.mark.parametrize("images, expected", [(1970, (200, 128, 4)), (60000, (5000, 256, 8)), (300, (60, 16, 1))])
def test_derived_hold_out_batch_and_bn_groups_scale_with_the_data(images: int, expected: tuple[int, int, int]) -> None:
    config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent"])
    facts = DataFacts(images=images, labelled=True, classes=4, gray=False, short_side=500)
    derive_data_options(config, facts, CPU)
    derive_training_options(config, images - config.data.val_size, CPU)
    assert (config.data.val_size, config.optim.batch_size, config.model.bn_splits) == expected
    assert config.model.K <= (images - config.data.val_size) // 2
    assert config.data.channels == 3 and config.data.image_size == 64


@pytest.mark.parametrize("method, derives_k", [("moco", True), ("memory_bank", True), ("moco_v3", False), ("byol", False)])
def test_the_queue_size_is_derived_and_printed_only_for_methods_with_k_negatives(method: str, derives_k: bool) -> None:
    config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent", f"model.method={method}"])
    derive_data_options(config, DataFacts(images=22000, labelled=True, classes=4, gray=False, short_side=500), CPU)
    notes = derive_training_options(config, 20000, CPU)
    assert any(note.startswith("model.K=") for note in notes) == derives_k
    assert config.model.K == (10000 // 256 * 256 if derives_k else 256)  # half the images, whole batches of 256
    assert "model.K" not in auto_options(config)


def test_a_queue_size_set_by_hand_shapes_the_batch_only_for_methods_that_use_it() -> None:
    facts = DataFacts(images=22000, labelled=True, classes=4, gray=False, short_side=500)
    batches = {}
    for method in ("moco", "moco_v3"):
        config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent", f"model.method={method}",
                                                             "model.K=1000"])
        derive_data_options(config, facts, CPU)
        derive_training_options(config, 20000, CPU)
        batches[method] = config.optim.batch_size
    assert batches == {"moco": 8, "moco_v3": 256}  # the queue takes whole batches: 1000 = 125 x 8


def test_derived_epochs_give_every_method_about_the_time_of_moco_v2() -> None:
    facts = DataFacts(images=2000, labelled=True, classes=4, gray=False, short_side=300)
    epochs, notes = {}, {}
    for images in (1800, 300):
        for setting in ("model.method=moco", "model.method=moco_v3", "model.method=simclr", "model.method=memory_bank",
                        "model.symmetric=true"):
            config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent", setting])
            config.train.budget = ""  # the count of images seen (a GPU's rule, at a CPU's scale), not a CPU's time
            derive_data_options(config, facts, CPU)
            found = derive_training_options(config, images, CPU)
            notes[images, setting[6:]] = next(n for n in found if n.startswith("optim.epochs="))
            epochs[images, setting[6:]] = config.optim.epochs
    # 4 : 8 : 6 : 3 : 8 encoder passes per image
    assert [epochs[1800, s] for s in ("method=moco", "method=moco_v3", "method=simclr", "method=memory_bank",
                                      "symmetric=true")] == [167, 83, 111, 222, 83]
    assert notes[1800, "method=moco"] == "optim.epochs=167 (about 300,600 images seen)"
    assert notes[1800, "method=moco_v3"].endswith("2x MoCo v2's encoder work per image: MoCo v2 would get 167)")
    # On 300 images the bounds hold for every method: 800 for v2 and the memory bank alike, and the note says so.
    assert [epochs[300, s] for s in ("method=moco", "method=moco_v3", "method=memory_bank")] == [800, 500, 800]
    assert notes[300, "method=memory_bank"].endswith("0.75x MoCo v2's encoder work per image: MoCo v2 would get 800)")


def test_the_folder_v3_preset_is_the_folder_preset_with_the_v3_choices_measured_in_the_docs() -> None:
    v3_choices = ["model.method=moco_v3", "model.T=0.1", "model.bn_splits=1", "model.m_schedule=cosine",
                  "moco_v3.mlp_dim=512", "optim.optimizer=sgd", "optim.lr=0.24", "optim.warmup_epochs=10",
                  "train.output_dir=runs/folder_v3", "model.K=4096"]  # (K unused by v3: not derived)
    preset = load_config(resolve_config_path("folder_v3"), ["data.root=/x"])
    assert preset.to_dict() == load_config(resolve_config_path("folder"), ["data.root=/x", *v3_choices]).to_dict()
    preset.train.budget = ""  # the count of images seen, as on a GPU
    derive_data_options(preset, DataFacts(images=2000, labelled=True, classes=4, gray=False, short_side=300), CPU)
    derive_training_options(preset, 1800, CPU)
    assert (preset.optim.epochs, preset.optim.batch_size, preset.model.bn_splits) == (83, 128, 1)  # half of v2's 167


def test_a_short_folder_v3_run_is_told_to_shorten_the_warm_up_too() -> None:
    with pytest.raises(ConfigError, match=r"optim.warmup_epochs: must lie in \[0, optim.epochs=5\), got 10.0: lower it"):
        load_config(resolve_config_path("folder_v3"), ["data.root=/x", "optim.epochs=5"])
    assert load_config(resolve_config_path("folder_v3"), ["data.root=/x", "optim.epochs=5",
                                                           "optim.warmup_epochs=1"]).optim.warmup_epochs == 1


def test_a_batch_set_by_hand_gets_bn_groups_that_divide_it() -> None:
    facts = DataFacts(images=5000, labelled=False, classes=0, gray=True, short_side=64)
    for batch, splits in ((96, 3), (100, 2)):  # 100 / 3 is no whole group: two groups of 50
        config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent", f"optim.batch_size={batch}"])
        derive_data_options(config, facts, CPU)
        derive_training_options(config, 5000, CPU)
        assert config.model.bn_splits == splits and config.model.K % batch == 0


def test_unlabelled_folders_hold_nothing_out() -> None:
    config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent"])
    derive_data_options(config, DataFacts(images=5000, labelled=False, classes=0, gray=True, short_side=20), CPU)
    assert config.data.val_size == 0 and config.data.image_size == 20 and config.model.stem_stride == 1
    assert config.aug.crop_scale == [0.85, 1.0] and config.aug.blur_p == 0.0  # a fifth of 20 px is too little


def test_auto_is_refused_for_options_that_cannot_be_derived() -> None:
    with pytest.raises(ConfigError, match="model.T: expected a number"):
        load_config(None, ["model.T=auto"])


def test_errors_in_set_options_show_before_any_data_is_read() -> None:
    with pytest.raises(ConfigError, match="model.m: momentum must lie in"):
        load_config(resolve_config_path("folder"), ["data.root=/nonexistent", "model.m=2"])


def test_a_queue_longer_than_the_data_is_refused() -> None:
    config = load_config(None, ["model.K=4096", "optim.batch_size=256"])
    check_queue_fits(config, 5000)
    with pytest.raises(ConfigError, match=r"model.K: the queue of 4,096 keys is longer than the 1,970"):
        check_queue_fits(config, 1970)


def test_pretraining_crops_reach_the_sides_of_a_wide_photo(tmp_path: Path) -> None:
    """A 4:1 panorama whose left quarter is white: centre-cropped it never shows the white part,
    squeezed whole with its aspect ratio passed on, views of it do."""
    pixels = np.zeros((50, 200), dtype=np.uint8)
    pixels[:, :50] = 255
    (tmp_path / "wide").mkdir()
    Image.fromarray(pixels).save(tmp_path / "wide" / "pano.png")
    folder = ImageFolderDataset(tmp_path / "wide", load_size=32, channels=1)
    centre, _, _ = folder[0]
    assert centre.max() == 0  # the shorter side's centre square misses the white quarter
    whole = whole_images(folder)
    image, _, index = whole[0]
    aspect = aspect_ratios_of(whole, torch.tensor([index]))
    assert aspect is not None and aspect.item() == pytest.approx(4.0)
    assert aspect_ratios_of(folder, torch.tensor([0])) is None
    torch.manual_seed(0)
    views = random_resized_crop_flip(image[None].float().expand(64, -1, -1, -1) / 255,
                                     preset("v2", size=16, crop_scale=(0.2, 1.0)), aspect.expand(64))
    white = (views.flatten(1).mean(1) > 0.5).float().mean().item()
    assert 0.05 < white < 0.6  # some views come from the white quarter, most do not


def test_crop_ratios_are_drawn_in_the_original_geometry() -> None:
    """On a squeezed 2:1 image, a square crop in the original is twice as tall as wide in the square."""
    spec = preset("none", size=8, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    x = torch.zeros(1, 1, 64, 64)
    x[..., :, :32] = 1.0  # left half white: a crop's white share tells its width
    torch.manual_seed(1)
    wide = random_resized_crop_flip(x.expand(500, -1, -1, -1), spec, torch.full((500,), 2.0))
    torch.manual_seed(1)
    square = random_resized_crop_flip(x.expand(500, -1, -1, -1), spec)
    # Narrower crops (0.35 of the squeezed width instead of 0.5) more often sit wholly on one side.
    pure = lambda v: ((v.flatten(1).mean(1) == 0) | (v.flatten(1).mean(1) == 1)).float().mean()  # noqa: E731
    assert pure(wide) > pure(square) + 0.1


def test_a_small_folder_decoded_into_memory_trains_exactly_as_file_by_file(tmp_path: Path) -> None:
    """Decoding once is only faster: same images, same order, same aspect ratios, same weights."""
    from moco.checkpoint import load_checkpoint
    from moco.train import pretrain
    from tests.tiny import tiny_config

    config_path = tiny_config(tmp_path, folder_workers=1, optim__epochs=1, train__knn_every=0)
    runs = {}
    for name, budget in (("files", 0), ("memory", 64)):
        config = load_config(config_path, [f"data.in_memory_mb={budget}", f"train.output_dir={tmp_path / name}"])
        data = build_data(config)
        assert isinstance(data.pretrain, TensorImageDataset) == (budget > 0)
        pretrain(config)
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint_last.pth")["model"]
    assert runs["files"].keys() == runs["memory"].keys()
    for key in runs["files"]:
        assert torch.equal(runs["files"][key], runs["memory"][key]), key


@pytest.mark.parametrize("short_side, image_size, scale, expected", [
    (375, 224, 0.2, 375),    # ImageNet's typical file: its own side, not 501 px of interpolated pixels
    (1000, 224, 0.2, 501),   # large files: what a fifth of the area needs to give 224 px without upsampling
    (100, 64, 0.2, 100),
    (1000, 64, 0.85, 70),    # large crops need little margin
    (30, 64, 0.2, 64)])      # small files: never below the view
def test_the_pretraining_side_is_what_the_smallest_crop_needs_at_most_the_files_own(
        short_side: int, image_size: int, scale: float, expected: int) -> None:
    config = load_config(resolve_config_path("folder"), [f"data.image_size={image_size}",
                                                         f"aug.crop_scale=[{scale}, 1.0]"])
    facts = DataFacts(images=1000, labelled=True, classes=10, gray=False, short_side=short_side)
    side, why = pretrain_load_size_for(config, facts)
    assert side == expected and why


@pytest.mark.parametrize("in_memory_mb", [0, 64])
def test_pretraining_crops_come_from_the_larger_side_and_evaluation_keeps_its_own(tmp_path: Path,
                                                                                 in_memory_mb: int) -> None:
    root = _folder(tmp_path / "imgs", (20, 20), size=(120, 90), mode="RGB")
    config = load_config(resolve_config_path("folder"), [
        f"data.root={root}", "data.image_size=32", "data.pretrain_load_size=auto", "data.workers=0",
        f"data.in_memory_mb={in_memory_mb}", "data.val_size=8"])
    data = build_data(config)
    assert config.data.pretrain_load_size == 72  # ceil(32 / sqrt(0.2)), within the files' 90 px
    assert any(n.startswith("data.pretrain_load_size=72 (the smallest crop") for n in data.derived)
    assert data.pretrain[0][0].shape == (3, 72, 72) and data.val[0][0].shape == (3, 32, 32)
    assert isinstance(data.pretrain, TensorImageDataset) == (in_memory_mb > 0)


def test_into_memory_keeps_every_image_and_the_aspect_ratios(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", (5, 3), size=(40, 20), mode="RGB")
    folder = ImageFolderDataset(root / "train", load_size=16, channels=3)
    memory = into_memory(whole_images(folder))
    assert len(memory) == 8 and memory.labels.tolist() == [0] * 5 + [1] * 3
    assert torch.equal(memory.images[6], whole_images(folder)[6][0])
    assert memory.aspect.tolist() == [2.0] * 8
    assert torch.equal(aspect_ratios_of(memory.subset(torch.tensor([1, 7])), torch.tensor([1])), torch.tensor([2.0]))
    assert into_memory(folder).aspect is None  # centre-cropped images were not squeezed


def test_a_folder_runs_summary_sets_its_knn_beside_raw_pixels_and_an_untrained_encoder(tmp_path: Path) -> None:
    """On a user's labelled folder the final report says at once whether pretraining paid: centred
    raw pixels at k = 10 and 200 and the untrained encoder, by the same kNN, beside the run's own."""
    from moco.monitor import pixel_knn
    from moco.train import pretrain
    from tests.tiny import tiny_config

    config_path = tiny_config(tmp_path, folder_workers=1, optim__epochs=1, train__knn_every=0)
    (tmp_path / "data" / "test").symlink_to(tmp_path / "data" / "train")  # a labelled test split
    config = load_config(config_path, ["data.in_memory_mb=64", "train.knn_centre=true", "train.knn_k=200"])
    pretrain(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # the exported feature at the pixel baseline's k, centred as the baseline is; k=200 is the headline
    assert summary["knn_centred"] is True
    assert summary["test_knn_top1_backbone_k200"] == summary["test_knn_top1_backbone"]
    assert 0 <= summary["test_knn_top1_backbone_k10"] <= 100
    baselines = summary["baselines"]
    assert set(baselines) == {"raw_pixels_k10", "raw_pixels_k200", "random_init_backbone", "random_init_encoder"}
    assert all(0 <= value <= 100 for value in baselines.values())
    data = build_data(config)
    assert pixel_knn(data.full_train, data.test, data, config) == {10: baselines["raw_pixels_k10"],
                                                                  200: baselines["raw_pixels_k200"]}
    assert baselines["raw_pixels_k10"] > 90  # the stripes' positions are plain in the pixels
