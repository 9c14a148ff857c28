"""The end-to-end and memory-bank mechanisms: negatives, gradients, bank refreshes, sampling."""

import pytest
import torch
import torch.nn.functional as F

from moco.config import ConfigError, load_config
from moco.methods import EndToEnd, MemoryBankContrast, build_method
from moco.dictionary import MemoryBank
from tests.eval_helpers import TINY_MODEL
from tests.conftest import LinearEncoder


def test_end_to_end_batch_of_n_gives_n_minus_1_negatives_in_batch_order() -> None:
    model = EndToEnd(LinearEncoder, dim=8, T=0.1, shuffle_bn=False)
    x1, x2 = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    out = model.contrastive_loss(x1, x2)
    assert out.logits.shape == (6, 6) and out.labels.tolist() == [0] * 6  # 1 positive + 5 negatives
    q, k = F.normalize(model.encoder_q(x1), dim=1), F.normalize(model.encoder_q(x2), dim=1)
    for i in range(6):
        others = [j for j in range(6) if j != i]
        torch.testing.assert_close(out.logits[i, 0], q[i] @ k[i] / 0.1)
        torch.testing.assert_close(out.logits[i, 1:], q[i] @ k[others].T / 0.1)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, out.labels))


def test_end_to_end_gradients_reach_the_keys() -> None:
    torch.manual_seed(1)
    model = EndToEnd(LinearEncoder, dim=8, T=0.1, shuffle_bn=False)
    x1, x2 = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8).requires_grad_(True)
    model.contrastive_loss(x1, x2).loss.backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0  # the key view is differentiated
    full_grad = model.encoder_q.fc.weight.grad.clone()
    # With the keys detached the encoder gradient is different: the keys' part is really in it.
    model.zero_grad()
    q = model.encode_query(x1)
    k = model.encode_key(x2).detach()
    from moco.loss import in_batch_logits

    logits = in_batch_logits(q, k, 0.1)
    F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)).backward()
    assert (full_grad - model.encoder_q.fc.weight.grad).abs().max() > 1e-4


def test_end_to_end_shuffle_bn_restores_key_order() -> None:
    encoder = LinearEncoder(num_classes=8)
    plain = EndToEnd(encoder, dim=8, T=0.2, shuffle_bn=False)
    shuffled = EndToEnd(encoder, dim=8, T=0.2, shuffle_bn=True)
    x1, x2 = torch.randn(7, 1, 8, 8), torch.randn(7, 1, 8, 8)
    # A BN-free encoder sees no batch statistics, so shuffling must change nothing but the order.
    torch.testing.assert_close(shuffled.contrastive_loss(x1, x2).logits, plain.contrastive_loss(x1, x2).logits)
    sym = plain.contrastive_loss(x1, x2, symmetric=True)
    assert sym.logits.shape == (14, 7)
    torch.testing.assert_close(sym.loss, F.cross_entropy(sym.logits[:7], sym.labels[:7])
                               + F.cross_entropy(sym.logits[7:], sym.labels[7:]))


def test_memory_bank_update_refreshes_exactly_the_given_rows_with_momentum() -> None:
    bank = MemoryBank(size=10, dim=4, momentum=0.5)
    before = bank.features.clone()
    torch.testing.assert_close(before.norm(dim=1), torch.ones(10))
    idx = torch.tensor([2, 7, 5])
    new = F.normalize(torch.randn(3, 4), dim=1)
    bank.update(idx, new)
    torch.testing.assert_close(bank.features[idx], F.normalize(0.5 * before[idx] + 0.5 * new, dim=1))
    untouched = [i for i in range(10) if i not in (2, 5, 7)]
    assert torch.equal(bank.features[untouched], before[untouched])
    with pytest.raises(IndexError, match="out of range"):
        bank.update(torch.tensor([10]), new[:1])


def test_memory_bank_contrast_uses_stored_positive_then_refreshes_only_the_batch() -> None:
    model = MemoryBankContrast(LinearEncoder, bank_size=12, dim=8, K=5, T=0.1, bank_momentum=0.5)
    old = model.bank.features.clone()
    x1, x2 = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    idx = torch.tensor([4, 0, 9])
    out = model.contrastive_loss(x1, x2, indices=idx)
    q = F.normalize(model.encoder_q(x1), dim=1).detach()
    assert out.num_logits == 1 + 5
    torch.testing.assert_close(out.positives, old[idx])  # the positive is the entry before its refresh
    torch.testing.assert_close(out.logit_stats[1], ((q * old[idx]).sum(1) / 0.1).mean())
    torch.testing.assert_close(model.bank.features[idx], F.normalize(0.5 * old[idx] + 0.5 * q, dim=1))
    rest = [i for i in range(12) if i not in (0, 4, 9)]
    assert torch.equal(model.bank.features[rest], old[rest])
    assert "bank.features" in model.state_dict()  # checkpoints (and resume) carry the bank
    with pytest.raises(ValueError, match="dataset index"):
        model.contrastive_loss(x1, x2)


def test_memory_bank_sampling_is_uniform_over_all_entries_positives_included() -> None:
    bank = MemoryBank(size=8, dim=4)
    negatives, idx = bank.sample(4000, generator=torch.Generator().manual_seed(0))
    assert negatives.shape == (4, 4000)
    torch.testing.assert_close(negatives, bank.features[idx].T)
    counts = torch.bincount(idx, minlength=8)
    assert (counts > 0).all()  # every entry, the batch's own included, can be drawn: nothing excluded
    assert counts.min() > 400 and counts.max() < 600  # uniform: 500 expected each


def test_memory_bank_proximal_term_adds_distance_to_stored_feature() -> None:
    torch.manual_seed(3)
    plain = MemoryBankContrast(LinearEncoder(num_classes=8), bank_size=6, dim=8, K=4, T=0.1)
    prox = MemoryBankContrast(LinearEncoder(num_classes=8), bank_size=6, dim=8, K=4, T=0.1, proximal=0.3)
    prox.load_state_dict(plain.state_dict())
    x, idx = torch.randn(2, 1, 8, 8), torch.tensor([1, 3])
    stored = plain.bank.features[idx].clone()
    q = F.normalize(plain.encoder_q(x), dim=1)
    torch.manual_seed(5)
    a = plain.contrastive_loss(x, x, indices=idx).loss
    torch.manual_seed(5)
    b = prox.contrastive_loss(x, x, indices=idx).loss
    torch.testing.assert_close(b - a, 0.3 * (q - stored).pow(2).sum(1).mean())


def test_method_option_builds_each_mechanism_and_rejects_impossible_combinations() -> None:
    kinds = {m: type(build_method(load_config(None, TINY_MODEL + [f"model.method={m}"]), channels=1, bank_size=20)).__name__
             for m in ("moco", "end_to_end", "memory_bank")}
    assert kinds == {"moco": "MoCoMethod", "end_to_end": "EndToEnd", "memory_bank": "MemoryBankContrast"}
    # K need not be a multiple of the batch for the mechanisms without a queue.
    assert load_config(None, ["model.method=memory_bank", "model.K=1000"]).model.K == 1000
    with pytest.raises(ConfigError, match="model.method: 'queue' is not one of"):
        load_config(None, ["model.method=queue"])
    with pytest.raises(ConfigError, match="model.symmetric: not available with model.method=memory_bank"):
        load_config(None, ["model.method=memory_bank", "model.symmetric=true"])
    with pytest.raises(ConfigError, match="memory_bank.momentum: must lie in"):
        load_config(None, ["model.method=memory_bank", "memory_bank.momentum=1.5"])
    with pytest.raises(ConfigError, match="unknown option memory_bank.momentm; did you mean memory_bank.momentum"):
        load_config(None, ["model.method=memory_bank", "memory_bank.momentm=0.5"])
    # The option's old place (configs and checkpoints written before the method sections) still loads.
    assert load_config(None, ["model.method=memory_bank", "model.bank_proximal=0.2"]).method_options().proximal == 0.2
