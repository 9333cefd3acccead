"""The GPT decoder: causality, the generation cache, sizes, weight tying."""

from __future__ import annotations

import pytest
import torch

from trainlab.chat.config import GPTConfig
from trainlab.chat.model import GPT
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
    from dataclasses import fields

    preset = load_preset("chat", "chatgot-14m")
    cfg = GPTConfig(**{f.name: preset[f.name] for f in fields(GPTConfig) if f.name in preset}, vocab_size=65)
    assert (cfg.d_model, cfg.num_layers, cfg.nhead, cfg.context_len) == (384, 8, 6, 256)
    assert (cfg.positions, cfg.norm, cfg.qk_norm, cfg.mlp, cfg.d_ff) == ("rotary", "rmsnorm", True, "swiglu", 1024)
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


# -- the modern block, piece by piece ---------------------------------------------------------
MODERN = [dict(positions="rotary"), dict(norm="rmsnorm"), dict(positions="rotary", qk_norm=True),
          dict(mlp="relu2"), dict(mlp="swiglu"), dict(zero_init=True), dict(logit_softcap=15.0),
          dict(positions="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_weights=False)]


@pytest.mark.parametrize("opts", MODERN, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_modern_piece_is_causal_and_its_cache_matches_a_full_pass(opts):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **opts})).eval()
    if opts.get("zero_init"):  # zero output projections: every block starts as the identity
        assert all(float(b.attn.proj.weight.abs().max()) == 0 and float(b.mlp.down.weight.abs().max()) == 0
                   for b in model.blocks)
        for b in model.blocks:
            torch.nn.init.normal_(b.attn.proj.weight, std=0.02)  # so the checks below see attention at work
    x = torch.randint(0, 11, (2, 16))
    full, _ = model(x)
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 11
    assert torch.equal(model(y)[0][:, :9], full[:, :9])  # causal
    logits, cache = model(x[:, :5])
    parts = [logits]
    for t in range(5, 16):
        logits, cache = model(x[:, t:t + 1], cache)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    if opts.get("logit_softcap"):
        assert float(full.abs().max()) < opts["logit_softcap"]


def test_rotary_attention_depends_on_relative_positions_only():
    """RoPE: the same two tokens at positions (i, j) and (i + s, j + s) score alike."""
    from trainlab.chat.model import rotary_tables, rotate

    cfg = GPTConfig(**{**TINY, "positions": "rotary", "context_len": 64})
    cos, sin = rotary_tables(cfg)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(i, j):
        return float((rotate(q, cos[i][None, None, None], sin[i][None, None, None]) *
                      rotate(k, cos[j][None, None, None], sin[j][None, None, None])).sum())

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 5), rel=1e-3)


def test_modern_options_are_checked_and_old_configs_build_the_classic_block():
    with pytest.raises(ConfigError, match="--positions.*even head width"):
        GPTConfig(**{**TINY, "d_model": 36, "nhead": 4, "positions": "rotary"})  # head width 9
    for field, value in (("positions", "absolute"), ("norm", "batchnorm"), ("mlp", "relu"),
                         ("logit_softcap", -1.0), ("rope_base", 0.0)):
        with pytest.raises(ConfigError, match="--" + field.replace("_", "-")):
            GPTConfig(**{**TINY, field: value})
    classic = GPT(GPTConfig(**TINY))
    names = set(classic.state_dict())
    assert "pos.weight" in names and not any("gate" in n or "q_norm" in n for n in names)
    from trainlab.config import build

    old = {k: v for k, v in TINY.items()}  # a model_config.json from before the options
    assert build(GPTConfig, old) == GPTConfig(**TINY)


# -- the written-out attention of CPU half-precision training ----------------------------------
def test_written_out_attention_matches_the_fused_kernel_and_its_gradients():
    import torch.nn.functional as F

    from trainlab.chat.model import causal_attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 9, 8)
    ours = causal_attend(q, k, v, 0.0)
    grads = torch.autograd.grad(ours, (q, k, v), g)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, fused, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(fused, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    y = k.detach().clone()
    y[:, :, 6] += 1.0  # a later key never changes an earlier output
    assert torch.equal(causal_attend(q, y, v, 0.0)[:, :, :6], ours[:, :, :6])
    torch.manual_seed(1)
    dropped = causal_attend(q, k, v, 0.5)
    assert not torch.allclose(dropped, ours)  # dropout acts on the attention weights


def test_cpu_half_precision_training_takes_the_written_out_path_with_the_same_loss(monkeypatch):
    from trainlab.chat import model as chat_model

    q = torch.zeros(1, 1, 2, 4)
    assert not chat_model.written_out_is_faster(q)  # fp32: the fused kernel is the faster
    assert chat_model.written_out_is_faster(q, 0.1)  # unless with dropout, which it cannot fuse on a CPU
    assert chat_model.written_out_is_faster(q.bfloat16()) and chat_model.written_out_is_faster(q.half())
    with torch.no_grad():
        assert not chat_model.written_out_is_faster(q.bfloat16())  # forward only: fused is faster
        assert not chat_model.written_out_is_faster(q, 0.1)
    taken = []
    real = chat_model.causal_attend
    monkeypatch.setattr(chat_model, "causal_attend", lambda *a: taken.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **MODERN[-1]}))
    x = torch.randint(0, 11, (2, 16))
    with torch.no_grad():
        reference, _ = model(x)  # fp32, the fused kernel
    assert taken == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        written, _ = model(x)  # grad enabled: the written-out path, once a layer
        assert taken == [torch.bfloat16] * TINY["num_layers"]
        with torch.no_grad():
            fused, _ = model(x)
    assert len(taken) == TINY["num_layers"]  # no_grad: the fused kernel again
    # within bf16's own rounding at the logits' scale (a unit in the last place is 2^-8 of it),
    # and no further from fp32 than the fused bf16 kernel is, give or take one such unit
    ulp = 2.0 ** -8 * reference.abs().max().item()
    err_written = (written.float() - reference).abs().max().item()
    err_fused = (fused.float() - reference).abs().max().item()
    assert err_written <= 4 * ulp, (err_written, ulp)
    assert err_written <= err_fused + ulp, (err_written, err_fused, ulp)
    written.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attention_dropout_defaults_to_dropout_and_zero_keeps_the_fused_kernel_in_fp32(monkeypatch):
    """--attn-dropout 0 with --dropout above it: the residual paths still drop, attention's
    probabilities do not, so fp32 training on a CPU keeps the fused kernel (the written-out
    product, which dropout there needs, made a chat-1min-dropout fp32 step 1.17x as long)."""
    from trainlab.chat import model as chat_model
    from trainlab.config import build

    assert GPTConfig(**{**TINY, "dropout": 0.2}).attention_dropout == 0.2  # not given: as before
    assert build(GPTConfig, {**TINY, "dropout": 0.2}).attn_dropout is None  # a config saved before it
    assert GPTConfig(**{**TINY, "dropout": 0.2, "attn_dropout": 0.0}).attention_dropout == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="--attn-dropout"):
            GPTConfig(**{**TINY, "attn_dropout": bad})
    taken = []
    real = chat_model.causal_attend
    monkeypatch.setattr(chat_model, "causal_attend", lambda *a: taken.append(a[3]) or real(*a))
    x = torch.randint(0, 11, (2, 16))
    for attn, expect in ((None, [0.2] * TINY["num_layers"]), (0.0, [])):
        taken.clear()
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**TINY, **MODERN[-1], "dropout": 0.2, "attn_dropout": attn})).train()
        a, _ = model(x)
        assert taken == expect
        torch.manual_seed(1)
        b, _ = model(x)
        assert not torch.equal(a, b)  # the residual dropout still acts (a new mask, a new output)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x)[0], model(x)[0])


def pair_model(**kw) -> GPT:
    """A pair-embedding model whose pair table is random (it starts at zero), so pairs matter."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu",
                             "pair_embedding": True, **kw})).eval()
    assert torch.count_nonzero(model.pair.weight) == 0  # a fresh table says nothing yet
    torch.nn.init.normal_(model.pair.weight)
    return model


def test_pair_rows_read_the_previous_character_and_none_at_a_windows_start():
    from trainlab.chat.model import pair_ids, pair_rows

    cfg = GPTConfig(**{**TINY, "pair_embedding": True})
    V = cfg.vocab_size
    assert pair_rows(cfg) == V * (V + 1)
    idx = torch.tensor([[1, 2, 3]])
    assert pair_ids(cfg, idx, None).tolist() == [[V * V + 1, 1 * V + 2, 2 * V + 3]]
    assert pair_ids(cfg, idx, torch.tensor([7])).tolist() == [[7 * V + 1, 1 * V + 2, 2 * V + 3]]
    big = GPTConfig(**{**TINY, "pair_embedding": True, "vocab_size": 3000})  # 9M pairs: hashed into the cap
    assert pair_rows(big) == 2**16
    ids = pair_ids(big, torch.randint(0, 3000, (4, 16)), None)
    assert ids.min() >= 0 and ids.max() < 2**16


def test_the_previous_character_changes_the_next_logits_only_through_the_pair_table():
    model = pair_model()
    x = torch.randint(0, 11, (1, 16))
    base, _ = model(x)
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 11
    with torch.no_grad():
        out, _ = model(y)
        assert torch.equal(out[:, :6], base[:, :6])
        model.pair.weight.zero_()  # without the table, position 7 sees position 6 only through attention
        again, _ = model(y)
    assert not torch.allclose(out[:, 7], again[:, 7])


def test_a_pair_model_continues_its_cache_from_the_token_before():
    model = pair_model()
    x = torch.randint(0, 11, (1, 12))
    with torch.no_grad():
        full, _ = model(x)
        logits, cache = model(x[:, :5])
        parts = [logits]
        for t in range(5, 12):
            logits, cache = model(x[:, t:t + 1], cache, before=x[:, t - 1])
            parts.append(logits)
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="before"):
            model(x[:, :1], model(x[:, :5])[1])


def test_a_pair_model_generates_greedily_as_its_plain_forward_and_past_its_context():
    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.sampling import generate

    model = pair_model()
    prompt = [1, 4, 2]
    out = list(generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=10), str, torch.Generator()))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(10):  # within the context of 16: the plain forward of everything so far
            tokens.append(int(model(torch.tensor([tokens]))[0][0, -1].argmax()))
    assert "".join(out) == "".join(str(t) for t in tokens[3:])
    longer = "".join(generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=60), str,
                              torch.Generator()))
    assert len(longer) >= 60  # the window slid (at least one digit per character)


def test_a_pair_model_prefills_in_chunks_and_decodes_in_the_server_as_its_plain_forward():
    from trainlab.chat.slots import PREFILL_CHUNK, SlotCache, decode_rows, prefill_row

    ctx = PREFILL_CHUNK + 40
    model = pair_model(context_len=ctx)
    seq = torch.randint(0, 11, (ctx - 2,)).tolist()
    with torch.no_grad():
        plain = model(torch.tensor([seq]))[0][0]
    cache = SlotCache(model.cfg, 8)
    prefill_row(model, [3, 1, 4], cache, 0)  # another row, at another position
    # two chunks, the second of one position: its pair is the first chunk's last character and its own
    got = [prefill_row(model, seq[:PREFILL_CHUNK + 1], cache, 1)]
    for t in range(PREFILL_CHUNK + 1, ctx - 2):
        tokens = torch.tensor([5] * 8)
        tokens[1] = seq[t]
        got.append(decode_rows(model, tokens, cache, [r in (0, 1) for r in range(8)])[1])
        cache.lengths[0] += 1
        cache.lengths[1] += 1
    torch.testing.assert_close(torch.stack(got[:-1]), plain[PREFILL_CHUNK:ctx - 3], rtol=1e-4, atol=1e-5)
