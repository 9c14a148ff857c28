"""InfoNCE: a (K+1)-way cross-entropy over ``q·k / T`` with the positive key at index 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the dictionary look-up, positive first.

    Args:
        q: queries, N x C, L2-normalised.
        k: the positive key of each query, N x C, L2-normalised.
        negatives: C x K negative keys (the queue's layout).
        temperature: T in ``q·k / T``.

    Returns:
        N x (1+K) logits; column 0 holds the positive.
    """
    # Computed in fp32 even under autocast: T=0.07 amplifies bf16 rounding of q·k.
    q, k, negatives = q.float(), k.float(), negatives.float()
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = q @ negatives
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def in_batch_logits(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """End-to-end logits: each query against every key of its own batch, positive first.

    Row i holds q_i·k_i in column 0, then q_i·k_j for the N−1 keys j ≠ i of the batch, so a batch
    of N gives exactly N−1 negatives per query and the same layout (and labels) as the queue.
    Gradients flow into ``k`` as well as ``q``.
    """
    q, k = q.float(), k.float()
    sim = q @ k.T
    n = sim.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return torch.cat([sim.diagonal().unsqueeze(1), sim[off_diagonal].view(n, n - 1)], dim=1) / temperature


def positive_first_labels(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy targets when the positive sits at index 0: all zeros."""
    return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss of queries against their positives and a shared set of negatives."""
    logits = info_nce_logits(q, k, negatives, temperature)
    return F.cross_entropy(logits, positive_first_labels(logits))


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce_loss`, usable in anyone's training loop."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(q, k, negatives, self.temperature)


def pretext_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose logit at the label is strictly above every other logit, as a 0-d tensor.

    Ties count as wrong: with collapsed features every logit ties, and an arg-max would pick
    index 0, the positive, so a collapsed encoder would score 100%.
    """
    logits = logits.detach().float()
    index = labels.view(-1, 1)
    target = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, float("-inf")).amax(dim=1)
    return (target > others).float().mean()


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose label strictly wins (the pretext task's accuracy; ties are wrong)."""
    return pretext_accuracy(logits, labels).item()
