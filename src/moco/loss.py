"""InfoNCE: a (K+1)-way cross-entropy over ``q·k / T`` with the positive key at index 0."""

from __future__ import annotations

import torch
from torch import nn


def similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·bᵀ`` (rows of ``a`` against rows of ``b``) in fp32, also inside a bf16/fp16 autocast.

    The one rule for every method: products that feed a softmax or Sinkhorn are fp32. Autocast
    would run them in bf16, whose 8-bit mantissa costs about 1% of a cosine, 10% of ``cos/T`` at
    T = 0.1 once exponentiated, and more in Sinkhorn's ``exp(score/ε)`` at ε = 0.05. The encoders
    stay in the low precision; these products are a small share of a step.
    """
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T


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
    # fp32 also under autocast: bf16 products cost the v2 demo 0.5 validation points on the encoder
    # output over three seeds (none on the backbone) and, at K = 65,536, sped a step up only with AMX
    # (docs/performance.md).
    scaled = q.float() / temperature
    l_pos = (scaled * k.float()).sum(dim=1, keepdim=True)
    return torch.cat([l_pos, similarities(scaled, negatives.T)], dim=1)


def in_batch_logits(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """End-to-end logits: each query against every key of its own batch, positive first.

    Row i holds q_i·k_i in column 0, then q_i·k_j for the N−1 keys j ≠ i of the batch, so a batch
    of N gives exactly N−1 negatives per query and the same layout (and labels) as the queue.
    Gradients flow into ``k`` as well as ``q``.
    """
    sim = similarities(q, k)
    n = sim.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return torch.cat([sim.diagonal().unsqueeze(1), sim[off_diagonal].view(n, n - 1)], dim=1) / temperature


def positive_first_labels(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy targets when the positive sits at index 0: all zeros."""
    return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


def _columns_per_block(rows: int, device: torch.device) -> int:
    """Negatives visited per block: about 2 MiB of fp32 logits on a CPU, so a block's logits stay in
    cache from their product through the exp to the product back; all at once on an accelerator,
    where each block costs kernel launches and memory traffic is cheap."""
    if device.type != "cpu":
        return 1 << 62
    return max(256, (2 << 20) // (4 * max(rows, 1)))


class _StreamedInfoNCE(torch.autograd.Function):
    """``cross_entropy(info_nce_logits(q, k, negatives, T), zeros)`` without the N x (1+K) logits.

    With a queue of 65,536 keys the logits, not the encoder, dominated a small model's step: on a
    CPU each pass over the 33 MB matrix (product, softmax, its gradient, the product back, the
    statistics) went to memory. Here the negatives are visited a block of columns at a time with a
    running-max (online) softmax: a block's logits are computed, exponentiated and multiplied back
    against the block while in cache, accumulating per row the normaliser ``Σ exp(l − max)`` and
    ``Σ exp(l − max)·n``, which at the end give the loss and the queries' gradient
    ``(softmax − onehot(0)) / (N·T)`` against ``[k, negatives]``. Gradients are computed in the
    forward, so nothing of size K is kept and the caller may update the queue at once. fp32
    throughout, as :func:`info_nce_logits`. Also returns the logits' statistics
    ``[pretext accuracy, mean positive logit, mean negative logit]`` (ties count as wrong), the
    layout of :func:`moco.diagnostics.logit_stats`.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,  # type: ignore[override]
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            n = q.shape[0]
            scaled = q / temperature
            positive = (scaled * k).sum(dim=1)
            running_max = positive.clone()  # the shift of each row's exponentials
            normaliser = torch.ones_like(positive)  # Σ exp(l − running_max), the positive's term included
            weighted = torch.zeros_like(q)  # Σ exp(l − running_max) · negative, over the negatives
            hardest = torch.full_like(positive, float("-inf"))
            negative_sum = q.new_zeros(())
            blocks = negatives.split(_columns_per_block(n, q.device), dim=1)
            for block in blocks:
                logits = scaled @ block
                block_max = logits.amax(dim=1)
                hardest = torch.maximum(hardest, block_max)
                negative_sum += logits.sum()
                new_max = torch.maximum(running_max, block_max)
                rescale = (running_max - new_max).exp_()
                exponentials = logits.sub_(new_max.unsqueeze(1)).exp_()
                normaliser.mul_(rescale).add_(exponentials.sum(dim=1))
                weighted.mul_(rescale.unsqueeze(1)).addmm_(exponentials, block.T)
                running_max = new_max
            log_normaliser = running_max + normaliser.log()
            loss = (log_normaliser - positive).mean()
            stats = torch.stack([(positive > hardest).float().mean(), positive.mean(),
                                 negative_sum / max(n * negatives.shape[1], 1)])
            need_q, need_k, need_negatives = ctx.needs_input_grad[:3]
            scale = 1.0 / (n * temperature)  # d loss / d logits = (softmax − onehot(0)) / N; logits = (q/T)·[k, n]
            d_positive = ((positive - log_normaliser).exp() - 1).unsqueeze(1)
            ctx.grads = ((weighted / normaliser.unsqueeze(1) + d_positive * k) * scale if need_q else None,
                         d_positive * q * scale if need_k else None,
                         _negatives_gradient(scaled, q, blocks, log_normaliser, scale) if need_negatives else None)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor, _d_stats: torch.Tensor):  # type: ignore[override]
        grads = tuple(None if g is None else g * d_loss for g in ctx.grads)
        del ctx.grads
        return (*grads, None)


def _negatives_gradient(scaled: torch.Tensor, q: torch.Tensor, blocks: tuple[torch.Tensor, ...],
                        log_normaliser: torch.Tensor, scale: float) -> torch.Tensor:
    """``q^T · softmax / (N·T)`` over the negatives' column blocks: a second pass, as it needs each
    row's final normaliser. MoCo's queue and the memory bank take no gradient; in-batch uses may."""
    return torch.cat([q.T @ (scaled @ block).sub_(log_normaliser.unsqueeze(1)).exp_() for block in blocks],
                     dim=1).mul_(scale)


def info_nce_loss_and_stats(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean InfoNCE loss and its logits' ``[pretext accuracy, mean positive, mean negative]``
    (detached), as cross-entropy of :func:`info_nce_logits` and
    :func:`moco.diagnostics.logit_stats` would give them, without forming the N x (1+K) logits
    and without keeping ``negatives`` for the backward: a queue may be updated in place right
    after this call."""
    return _StreamedInfoNCE.apply(q, k, negatives, temperature)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE loss of queries against their positives and a shared set of negatives."""
    return info_nce_loss_and_stats(q, k, negatives, temperature)[0]


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
