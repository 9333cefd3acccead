"""The GPT decoder: causality, the generation cache, sizes, weight tying."""

from __future__ import annotations

import pytest
import torch

from trainlab.chat.model import GPT, GPTConfig
from trainlab.config import ConfigError, load_preset

TINY = dict(d_model=32, nhead=4, num_layers=2, context_len=16, dropout=0.0, vocab_size=11)


def test_changing_a_future_token_never_changes_an_earlier_logit():
    model = GPT(GPTConfig(**TINY)).eval()
    x = torch.randint(0, 11, (2, 16))
    base, _ = model(x)
    for t in (3, 9, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 11
        out, _ = model(y)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_cached_generation_matches_a_full_forward_pass():
    model = GPT(GPTConfig(**TINY)).eval()
    x = torch.randint(0, 11, (1, 12))
    full, _ = model(x)
    logits, cache = model(x[:, :5])
    parts = [logits]
    for t in range(5, 12):
        logits, cache = model(x[:, t:t + 1], cache)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)  # 12 + 5 > 16


def test_chatgot_14m_preset_has_about_14m_parameters():
    preset = load_preset("chat", "chatgot-14m")
    keys = {"d_model", "nhead", "num_layers", "dim_feedforward", "context_len"}
    cfg = GPTConfig(**{k: preset[k] for k in keys}, vocab_size=65)
    assert (cfg.d_model, cfg.num_layers, cfg.nhead, cfg.d_ff, cfg.context_len) == (384, 8, 6, 1536, 256)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    assert 13.5e6 < n < 14.5e6, n


def test_weight_tying_is_optional():
    tied = GPT(GPTConfig(**TINY))
    assert tied.head.weight is tied.tok.weight
    untied = GPT(GPTConfig(**{**TINY, "tie_weights": False}))
    assert untied.head.weight is not untied.tok.weight
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 11 * 32


def test_bad_dimensions_name_the_flag():
    with pytest.raises(ConfigError, match="--d-model"):
        GPTConfig(**{**TINY, "d_model": 30})
    with pytest.raises(ConfigError, match="--dropout"):
        GPTConfig(**{**TINY, "dropout": 1.0})


def saved_for_backward(fn):
    """(fn(), bytes of the tensors autograd keeps for the backward pass outside checkpoints)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_gradient_checkpointing_same_loss_and_gradients_less_kept():
    cfgs = [GPTConfig(**{**TINY, "dropout": 0.1, "grad_checkpointing": gc}) for gc in (False, True)]
    plain, ckpt = GPT(cfgs[0]).train(), GPT(cfgs[1]).train()
    ckpt.load_state_dict(plain.state_dict())  # the same weights under the same names
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    x = torch.randint(0, 11, (4, 16))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG
        (logits, cache), kept = saved_for_backward(lambda: model(x))
        loss = logits.logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept, cache))
    (l0, g0, kept0, _), (l1, g1, kept1, cache1) = results
    assert torch.equal(l0, l1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept1 < 0.25 * kept0 and cache1 == []
    with torch.no_grad():  # generation is untouched: the cache is built as always
        assert len(ckpt.eval()(x[:, :3])[1]) == 2
