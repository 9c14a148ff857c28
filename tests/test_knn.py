"""Weighted kNN: exact on separable features, chunking does not change the answer."""

import torch
import torch.nn.functional as F

from moco.evaluate.knn import knn_accuracy, knn_predict, topk_accuracy


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
