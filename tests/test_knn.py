"""Weighted kNN: exact on separable features, chunking does not change the answer."""

import torch
import torch.nn.functional as F

import pytest

from moco.evaluate.knn import (PCAWhitening, faiss_available, knn_accuracies, knn_accuracy, knn_predict, knn_predict_many,
                               topk_accuracy)


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
    train_y = torch.randint(0, 5, (300,))
    test = F.normalize(torch.randn(70, 12), dim=1)
    many = knn_predict_many(train, train_y, test, 5, ks=(1, 10, 20, 200), temperature=0.1, chunk_size=16)
    for k, scores in many.items():
        torch.testing.assert_close(scores, knn_predict(train, train_y, test, 5, k=k, temperature=0.1))
    accs = knn_accuracies(train, train_y, test, torch.randint(0, 5, (70,)), ks=(1, 200), num_classes=5)
    assert set(accs) == {1, 200} and accs[200]["top5"] == 100.0


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
