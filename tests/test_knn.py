"""Weighted kNN: exact on separable features, chunking does not change the answer."""

import torch
import torch.nn.functional as F

import pytest

from torch import nn

from moco.evaluate.knn import (PCAWhitening, faiss_available, head_outputs, knn_accuracies, knn_accuracy, knn_predict,
                               knn_predict_many, topk_accuracy)
from moco.models.heads import add_mlp_head
from moco.models.resnet import backbone_features, resnet


def test_one_hot_features_give_perfect_accuracy_with_k1() -> None:
    labels = torch.arange(10).repeat(20)
    feats = F.one_hot(labels, 10).float()
    assert knn_accuracy(feats, labels, feats, labels, k=1, temperature=0.1) == 100.0


def test_chunked_equals_unchunked() -> None:
    train = F.normalize(torch.randn(500, 16), dim=1)
    train_y = torch.randint(0, 7, (500,))
    test = F.normalize(torch.randn(130, 16), dim=1)
    full = knn_predict(train, train_y, test, 7, k=20, temperature=0.1, chunk_size=10_000)
    chunked = knn_predict(train, train_y, test, 7, k=20, temperature=0.1, chunk_size=17)
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=0)  # exp(sim/T) reaches e^10


def test_votes_are_weighted_by_exp_similarity() -> None:
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    train_y = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, train_y, test, 2, k=3, temperature=0.5)
    expected = torch.tensor([[torch.exp(torch.tensor(2.0)), torch.exp(torch.tensor(1.2)) + torch.exp(torch.tensor(1.6))]])
    torch.testing.assert_close(scores, expected)
    # Two close neighbours of class 1 outvote one identical neighbour of class 0.
    assert topk_accuracy(scores, torch.tensor([1]), ks=(1,))[1] == 100.0


def test_several_k_from_one_search_equal_separate_searches() -> None:
    train = F.normalize(torch.randn(300, 12), dim=1)
    train_y = torch.randint(0, 8, (300,))
    test = F.normalize(torch.randn(70, 12), dim=1)
    test_y = torch.randint(0, 8, (70,))
    many = knn_predict_many(train, train_y, test, 8, ks=(1, 10, 20, 200), temperature=0.1, chunk_size=16)
    for k, scores in many.items():
        torch.testing.assert_close(scores, knn_predict(train, train_y, test, 8, k=k, temperature=0.1))
    accs = knn_accuracies(train, train_y, test, test_y, ks=(10, 200), num_classes=8, chunk_size=16)
    for k in (10, 200):  # 8 classes: top-5 is not 100% by construction
        separate = topk_accuracy(knn_predict(train, train_y, test, 8, k=k, temperature=0.1), test_y)
        assert accs[k] == {"top1": separate[1], "top5": separate[5]}


def test_top5_counts_a_label_ranked_sixth_as_a_miss() -> None:
    """Eight classes at 0, 20, ..., 140 degrees from the query: the votes rank them in that order."""
    angles = torch.deg2rad(torch.arange(8) * 20.0)
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    query = torch.tensor([[1.0, 0.0]]).repeat(3, 1)
    labels = torch.tensor([0, 3, 6])  # ranked 1st, 4th and 7th
    for k in (5, 8):  # k=5: classes 5-7 get no vote and rank below every voted class
        accs = knn_accuracies(train, torch.arange(8), query, labels, ks=(k,), temperature=0.5, num_classes=8)[k]
        assert accs["top1"] == pytest.approx(100 / 3) and accs["top5"] == pytest.approx(200 / 3)


def test_one_hot_labels_give_perfect_accuracy_for_every_k() -> None:
    labels = torch.arange(4).repeat(50)
    feats = F.one_hot(labels, 4).float()
    accs = knn_accuracies(feats, labels, feats, labels, ks=(1, 10, 20), temperature=0.1, chunk_size=7)
    assert all(acc["top1"] == 100.0 for acc in accs.values())


@pytest.mark.skipif(not faiss_available(), reason="faiss is optional and not installed")
def test_faiss_backend_matches_torch() -> None:
    train = F.normalize(torch.randn(400, 16), dim=1)
    train_y = torch.randint(0, 6, (400,))
    test = F.normalize(torch.randn(50, 16), dim=1)
    torch.testing.assert_close(knn_predict(train, train_y, test, 6, k=20, backend="faiss"),
                               knn_predict(train, train_y, test, 6, k=20, backend="torch"), rtol=1e-4, atol=1e-4)


def test_pca_whitening_gives_identity_covariance_on_the_bank() -> None:
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=g) * torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1, 0.05])
    bank = torch.randn(4000, 6, generator=g) @ mixing + 3.0
    white = PCAWhitening(bank)(bank)
    assert white.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(white.T), torch.eye(6), atol=1e-4)


def test_whitened_knn_ignores_any_invertible_linear_map_of_the_features() -> None:
    """Whitening undoes scale and correlation, so kNN on it sees the same neighbours whatever
    invertible affine map the encoder's last layer applied: cosine similarities are unchanged."""
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(500, 8, generator=g), torch.randn(50, 8, generator=g)
    a, b = torch.randn(8, 8, generator=g) + 3 * torch.eye(8), torch.randn(8, generator=g)
    plain, mapped = PCAWhitening(bank), PCAWhitening(bank @ a + b)
    sims = F.normalize(plain(queries), dim=1) @ F.normalize(plain(bank), dim=1).T
    sims_mapped = F.normalize(mapped(queries @ a + b), dim=1) @ F.normalize(mapped(bank @ a + b), dim=1).T
    assert torch.allclose(sims, sims_mapped, atol=1e-5)


def test_whitening_spreads_anisotropic_features_and_recovers_their_neighbours() -> None:
    """Two classes that differ only along a low-variance axis, on top of a large shared offset and a
    high-variance nuisance axis: cosine kNN is near chance, whitened kNN near perfect."""
    g = torch.Generator().manual_seed(2)
    n = 400
    labels = torch.arange(n) % 2
    signal = (labels.float() * 2 - 1) * 0.05 + 0.01 * torch.randn(n, generator=g)
    nuisance = 5.0 * torch.randn(n, generator=g)
    feats = torch.stack([signal, nuisance, torch.zeros(n)], 1) + torch.tensor([0.0, 0.0, 50.0])
    feats[:, 2] += 0.5 * torch.randn(n, generator=g)
    bank, bank_y, queries, query_y = feats[:300], labels[:300], feats[300:], labels[300:]
    plain = knn_accuracy(F.normalize(bank, dim=1), bank_y, F.normalize(queries, dim=1), query_y, k=20)
    whiten = PCAWhitening(bank)
    white = knn_accuracy(F.normalize(whiten(bank), dim=1), bank_y, F.normalize(whiten(queries), dim=1), query_y, k=20)
    assert plain < 75.0 and white > 95.0, (plain, white)


def test_rank_deficient_bank_drops_the_empty_directions() -> None:
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(5, 20, generator=g)  # rank 4 after centring
    whiten = PCAWhitening(bank)
    assert whiten.projection.shape == (20, 4)
    out = whiten(torch.randn(7, 20, generator=g))
    assert out.shape == (7, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("mlp", [False, True])
def test_head_outputs_of_backbone_features_equal_the_encoders_own_output(mlp: bool) -> None:
    torch.manual_seed(0)
    encoder = resnet("resnet18", num_classes=16, widths=(4, 8, 8, 8), in_channels=1, small_images=True)
    if mlp:
        add_mlp_head(encoder)
    encoder.train()  # head_outputs must evaluate the head in eval mode and restore the mode
    x = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        encoder.eval()
        expected, features = encoder(x), backbone_features(encoder, x)
        encoder.train()
    torch.testing.assert_close(head_outputs(encoder, features, batch=4), expected)
    assert encoder.training and encoder.fc.training


def test_head_outputs_of_an_encoder_without_head_are_its_features() -> None:
    features = torch.randn(5, 3)
    assert head_outputs(nn.Flatten(), features) is features


def test_monitor_scores_each_feature_with_its_own_knn(tiny_reference) -> None:
    """knn_eval's backbone / encoder figures equal kNN on features extracted each way on their own."""
    from moco.config import load_config
    from moco.data.augment import EvalTransform
    from moco.data.datasets import make_loader
    from moco.evaluate.knn import extract_features
    from moco.data.splits import build_data
    from moco.methods import build_method
    from moco.monitor import knn_eval

    config = load_config(tiny_reference[0], ["train.knn_k=5"])
    data = build_data(config)
    torch.manual_seed(3)
    model = build_method(config, data.channels)
    scores = knn_eval(model.encoder, data.monitor_bank, data.val, data, config, torch.device("cpu"), torch.contiguous_format,
                      whitened=True)
    preprocess = EvalTransform(config.data.image_size, data.mean, data.std)

    def manual(head: bool) -> float:
        bank, bank_y = extract_features(model.encoder_q, make_loader(data.monitor_bank, 64, shuffle=False,
                                                                     drop_last=False), preprocess, head=head)
        query, query_y = extract_features(model.encoder_q, make_loader(data.val, 64, shuffle=False, drop_last=False),
                                          preprocess, head=head)
        return knn_accuracy(bank, bank_y, query, query_y, 5, config.train.knn_t, data.num_classes)

    assert scores.backbone == pytest.approx(manual(head=False), abs=1e-6)
    assert scores.encoder == pytest.approx(manual(head=True), abs=1e-6)
    assert scores.of("backbone") == scores.backbone and scores.of("encoder") == scores.encoder
    assert scores.whitened is not None and 0 <= scores.whitened <= 100
    assert scores.whitened_note is None


def test_whitening_fitted_and_applied_in_chunks_equals_the_whole_bank_at_once() -> None:
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(1000, 5, generator=g) @ torch.randn(5, 5, generator=g) + 2.0
    queries = torch.randn(37, 5, generator=g)
    whole, chunked = PCAWhitening(bank), PCAWhitening(bank, chunk=64)
    torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.projection, whole.projection, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(chunked(queries), whole(queries), rtol=1e-6, atol=1e-6)


def test_an_fp16_bank_votes_in_fp32_and_agrees_with_fp32() -> None:
    """On a GPU the monitor searches an fp16 bank; 200 votes of exp(1 / 0.05) would overflow fp16."""
    g = torch.Generator().manual_seed(2)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(400) % 4
    bank = F.normalize(centres[labels] + 0.05 * torch.randn(400, 16, generator=g), dim=1)
    query_y = torch.arange(40) % 4
    queries = F.normalize(centres[query_y] + 0.05 * torch.randn(40, 16, generator=g), dim=1)
    scores = knn_predict(bank.half(), labels, queries.half(), 4, k=200, temperature=0.05)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all() and scores.max() > 65504
    assert knn_accuracy(bank.half(), labels, queries.half(), query_y, 200, 0.05, 4) == 100.0


def test_the_whitened_diagnostic_is_skipped_above_a_bank_size_and_says_so(tiny_reference, monkeypatch) -> None:
    from moco import monitor
    from moco.config import load_config
    from moco.data.splits import build_data
    from moco.methods import build_method

    config = load_config(tiny_reference[0], ["train.knn_k=5"])
    data = build_data(config)
    model = build_method(config, data.channels)
    monkeypatch.setattr(monitor, "WHITENED_MAX_BANK", len(data.monitor_bank) - 1)
    scores = monitor.knn_eval(model.encoder, data.monitor_bank, data.val, data, config, torch.device("cpu"),
                              torch.contiguous_format, whitened=True)
    assert scores.whitened is None
    assert scores.whitened_note == (f"PCA-whitened kNN skipped: a bank of {len(data.monitor_bank):,} features is above "
                                    f"{len(data.monitor_bank) - 1:,}")
    assert monitor.test_knn_fields(scores, "backbone")["test_knn_whitened_note"] == scores.whitened_note
    assert monitor.test_knn_line(scores, "backbone", 5, 0.1).endswith(scores.whitened_note)


def test_centred_knn_sees_what_tells_classes_apart_along_the_features_mean() -> None:
    """Pooled post-ReLU features all point near their large positive mean. The cosine of uncentred
    features is blind along that direction: classes that differ in how strongly they fire look the
    same. train.knn_centre centres on the bank's mean first, and then they separate."""
    from moco.evaluate.common import FeatureSet
    from moco.evaluate.report import CENTRED, KnnOptions, knn_rows

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    common = 1 + torch.rand(1, 16, generator=g)  # the direction every image shares
    features = (5 + 2 * labels[:, None].float()) * common + 0.3 * torch.randn(400, 16, generator=g)  # class 1 fires more
    sets = FeatureSet(features[:300], labels[:300], features[300:], labels[300:])
    plain = knn_rows(sets, "f", KnnOptions(ks=(10,)), 2)[0]
    centred = knn_rows(sets, "f", KnnOptions(ks=(10,), centre=True), 2)[0]
    assert plain["top1"] < 65 and centred["top1"] > 95 and centred["features"] == "f" + CENTRED
