"""engine/dropout.py: the cheaper CPU mask drops what it says, seeded, with the right gradient."""

import pytest
import torch

from trainlab.engine.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_a_mask_drops_p_of_its_elements_and_scales_the_rest(p):
    torch.manual_seed(0)
    m = keep_mask((1000, 1000), p, torch.float32)
    values = m.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
    dropped = (m == 0).double()
    sigma = (p * (1 - p) / m.numel()) ** 0.5
    assert abs(dropped.mean().item() - p) < 5 * sigma
    # each of the four 16-bit lanes of a 64-bit draw is as random as the others (a lane with a
    # bit that never varies would drop half or none of its elements)
    lanes = dropped.flatten().view(-1, 4).mean(0)
    assert ((lanes - p).abs() < 5 * sigma * 2).all(), lanes
    assert abs(m.mean().item() - 1.0) < 0.01  # expectation kept


def test_masks_follow_the_seed_and_the_generator_state():
    torch.manual_seed(3)
    a = keep_mask((7, 13), 0.3, torch.float32)
    b = keep_mask((7, 13), 0.3, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((7, 13), 0.3, torch.float32), a)  # an odd count: a partly used draw
    assert not torch.equal(a, b)
    state = torch.get_rng_state()
    c = keep_mask((5, 5), 0.5, torch.bfloat16)
    torch.set_rng_state(state)  # a retried or resumed pass draws the same mask
    assert torch.equal(keep_mask((5, 5), 0.5, torch.bfloat16), c) and c.dtype == torch.bfloat16


def test_dropout_is_identity_when_not_training_and_its_gradient_is_its_mask():
    x = torch.randn(6, 50)
    assert dropout(x, 0.4, training=False) is x and dropout(x, 0.0) is x
    x.requires_grad_(True)
    torch.manual_seed(1)
    y = dropout(x, 0.4)
    (g,) = torch.autograd.grad(y.sum(), x)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y[kept], x.detach()[kept] / 0.6)
    assert torch.equal(g, kept.float() / 0.6)
    for dt in (torch.bfloat16, torch.float16):
        assert dropout(x.detach().to(dt), 0.4).dtype == dt


def test_the_module_is_parameterless_checks_p_and_follows_train_and_eval():
    d = Dropout(0.25)
    assert list(d.state_dict()) == [] and "p=0.25" in repr(d)
    x = torch.ones(100, 100)
    assert (d(x) == 0).any()
    d.eval()
    assert torch.equal(d(x), x)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout probability"):
            Dropout(bad)
