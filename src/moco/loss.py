"""InfoNCE: a (K+1)-way cross-entropy over ``q·k / T`` with the positive key at index 0."""

from __future__ import annotations

import torch
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
    # fp32 also under autocast: bf16 products ran ~3x faster at K = 65,536 on an AVX-512 CPU but
    # cost the demo 1.7 points of validation kNN (docs/performance.md).
    with torch.autocast(q.device.type, enabled=False):
        scaled = q.float() / temperature
        l_pos = (scaled * k.float()).sum(dim=1, keepdim=True)
        l_neg = scaled @ negatives.float()
        return torch.cat([l_pos, l_neg], dim=1)


def in_batch_logits(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """End-to-end logits: each query against every key of its own batch, positive first.

    Row i holds q_i·k_i in column 0, then q_i·k_j for the N−1 keys j ≠ i of the batch, so a batch
    of N gives exactly N−1 negatives per query and the same layout (and labels) as the queue.
    Gradients flow into ``k`` as well as ``q``.
    """
    with torch.autocast(q.device.type, enabled=False):  # fp32: N x N is small, bf16 would save nothing
        q, k = q.float(), k.float()
        sim = q @ k.T
    n = sim.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return torch.cat([sim.diagonal().unsqueeze(1), sim[off_diagonal].view(n, n - 1)], dim=1) / temperature


def positive_first_labels(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy targets when the positive sits at index 0: all zeros."""
    return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


class _InfoNCE(torch.autograd.Function):
    """``cross_entropy(info_nce_logits(q, k, negatives, T), zeros)`` in fewer passes over the N x (1+K) logits.

    With a queue of 65,536 keys the logits, not the encoder, dominated a small model's step: the
    concatenation, the division by T and their backward each copied the N x (1+K) matrix, and the
    queue itself was cloned so that its in-place update could not corrupt the backward. Here the
    1/T is applied to the N x C queries, the negatives' products are written straight into the
    logits, and the gradients, ``(softmax − onehot(0)) / (N·T)`` against ``[k, negatives]``, are
    computed in the forward: nothing of size K is kept for the backward, so the caller may update
    the queue at once. Everything runs in fp32, as :func:`info_nce_logits`.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,  # type: ignore[override]
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            scaled = q / temperature
            logits = q.new_empty(q.shape[0], 1 + negatives.shape[1])
            torch.sum(scaled * k, dim=1, keepdim=True, out=logits[:, :1])
            torch.mm(scaled, negatives, out=logits[:, 1:])
            log_p = torch.log_softmax(logits, dim=1)
            loss = -log_p[:, 0].mean()
            need_q, need_k, need_negatives = ctx.needs_input_grad[:3]
            if need_q or need_k or need_negatives:
                # d loss / d logits = (softmax − onehot(0)) / N; the logits are (q/T)·[k, negatives].
                # The 1 / (N·T) scales the small products, not the N x (1+K) matrix.
                d_logits = log_p.exp_()
                d_logits[:, 0] -= 1
                d_pos, d_neg = d_logits[:, :1], d_logits[:, 1:]
                scale = 1.0 / (q.shape[0] * temperature)
                ctx.grads = ((d_neg @ negatives.T + d_pos * k) * scale if need_q else None,
                             d_pos * q * scale if need_k else None,
                             (q.T @ d_neg) * scale if need_negatives else None)
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor, _d_logits: torch.Tensor):  # type: ignore[override]
        grads = tuple(None if g is None else g * d_loss for g in ctx.grads)
        del ctx.grads
        return (*grads, None)


def info_nce_loss_and_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean InfoNCE loss and its N x (1+K) logits (detached, positive first), computed as
    :func:`info_nce_logits` then cross-entropy would, in fewer passes and without keeping
    ``negatives`` for the backward: a queue may be updated in place right after this call."""
    return _InfoNCE.apply(q, k, negatives, temperature)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss of queries against their positives and a shared set of negatives."""
    return info_nce_loss_and_logits(q, k, negatives, temperature)[0]


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
