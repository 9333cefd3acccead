import math

import pytest
import torch
import torch.nn.functional as F

from trainlab.config import ConfigError
from trainlab.multiply.config import PAD, LossConfig
from trainlab.multiply.loss import SequenceAccuracyLoss

V = 6


def one_hot_logits(tokens, scale=20.0):
    return F.one_hot(torch.tensor(tokens), V).float() * scale


def test_perfect_prediction_has_exact_match_one_and_tiny_loss():
    target = torch.tensor([[4, 5, 2, PAD], [5, 2, PAD, PAD]])
    loss, stats = SequenceAccuracyLoss(LossConfig())(one_hot_logits(target.tolist()), target)
    assert loss.item() < 1e-6
    assert stats["exact_match"].item() == 1.0 and stats["token_accuracy"].item() == 1.0


def test_pad_positions_are_ignored():
    target = torch.tensor([[4, 5, 2, PAD]])
    logits = torch.randn(1, 4, V)
    crit = SequenceAccuracyLoss(LossConfig())
    l1, _ = crit(logits, target)
    logits2 = logits.clone()
    logits2[0, 3] = torch.randn(V) * 10
    l2, _ = crit(logits2, target)
    assert torch.allclose(l1, l2)


def test_sequence_weighting_by_hand():
    # sequence 0 entirely right, sequence 1 half right
    target = torch.tensor([[4, 5], [4, 5]])
    logits = torch.zeros(2, 2, V)
    logits[0, 0, 4] = logits[0, 1, 5] = 3.0
    logits[1, 0, 4] = 3.0
    logits[1, 1, 3] = 3.0  # wrong token at position 1
    tok = F.cross_entropy(logits.view(4, V), target.view(4), reduction="none").view(2, 2)
    per_seq = tok.mean(1)
    plain, stats = SequenceAccuracyLoss(LossConfig(seq_weight=0.0))(logits, target)
    assert plain.item() == pytest.approx(per_seq.mean().item(), rel=1e-6)
    weighted, _ = SequenceAccuracyLoss(LossConfig(seq_weight=2.0))(logits, target)
    w = torch.tensor([1.0, 1.0 + 2.0 * 0.5])
    assert weighted.item() == pytest.approx(((w * per_seq).sum() / w.sum()).item(), rel=1e-6)
    assert weighted.item() > plain.item()  # the wrong sequence counts more
    assert stats["exact_match"].item() == 0.5 and stats["token_accuracy"].item() == 0.75


def test_label_smoothing_raises_the_loss_of_a_confident_right_answer():
    target = torch.tensor([[4, 5]])
    logits = one_hot_logits(target.tolist(), scale=10.0)
    plain, _ = SequenceAccuracyLoss(LossConfig())(logits, target)
    smooth, _ = SequenceAccuracyLoss(LossConfig(label_smoothing=0.1))(logits, target)
    assert smooth.item() > plain.item() + 0.1


def test_loss_has_gradient_and_finite_value():
    logits = torch.randn(3, 4, V, requires_grad=True)
    target = torch.tensor([[4, 2, PAD, PAD], [5, 5, 2, PAD], [4, 4, 4, 2]])
    loss, _ = SequenceAccuracyLoss(LossConfig(seq_weight=1.0, label_smoothing=0.1))(logits, target)
    loss.backward()
    assert math.isfinite(loss.item()) and logits.grad.abs().sum() > 0
    assert logits.grad[0, 2:].abs().sum() == 0  # no gradient reaches PAD positions


@pytest.mark.parametrize("kw, field", [(dict(label_smoothing=1.5), "label_smoothing"), (dict(seq_weight=-1), "seq_weight")])
def test_bad_loss_config(kw, field):
    with pytest.raises(ConfigError) as e:
        LossConfig(**kw)
    assert e.value.field == field
