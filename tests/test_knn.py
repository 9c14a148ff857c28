"""Weighted kNN: exact on separable features, chunking does not change the answer."""

import torch
import torch.nn.functional as F

import pytest

from moco.evaluate.knn import (faiss_available, knn_accuracies, knn_accuracy, knn_predict, knn_predict_many,
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
