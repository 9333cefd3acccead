import pytest
import torch

from trainlab.config import ConfigError
from trainlab.multiply.config import BOS, DIGIT0, EOS, PAD, TIMES, VOCAB_SIZE, Seq2SeqConfig
from trainlab.multiply.models import LatentTransformer, SimpleTransformer, build_model, greedy_decode


def cfg(kind="simple", **kw):
    base = dict(d_model=32, nhead=4, num_layers=2, num_latent=3, kind=kind, src_len=9, tgt_len=7)
    base.update(kw)
    return Seq2SeqConfig(**base)


def batch(B=4, S=7, T=7):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(DIGIT0, DIGIT0 + 10, (B, S), generator=g)
    src[:, S // 2] = TIMES
    tgt = torch.randint(DIGIT0, DIGIT0 + 10, (B, T), generator=g)
    tgt[:, 0] = BOS
    return src, tgt


@pytest.mark.parametrize("kind", ["simple", "latent"])
def test_output_shapes(kind):
    model = build_model(cfg(kind)).eval()
    src, tgt = batch()
    assert model(src, tgt).shape == (4, 7, VOCAB_SIZE)
    memory, mask = model.memory(src)
    if kind == "simple":
        assert memory.shape == (4, 7, 32) and mask.shape == (4, 7)
    else:
        assert memory.shape == (4, 3, 32) and mask is None  # the decoder sees 3 latents only


@pytest.mark.parametrize("kind", ["simple", "latent"])
def test_decoder_depth_can_differ_from_the_encoders(kind):
    deep_enc = build_model(cfg(kind, num_layers=3, decoder_layers=1)).eval()
    assert len(deep_enc.encoder) == 3 and len(deep_enc.decoder) == 1
    same = build_model(cfg(kind, num_layers=3))
    assert len(same.encoder) == len(same.decoder) == 3  # 0, the default, follows num_layers
    src, tgt = batch()
    assert deep_enc(src, tgt).shape == (4, 7, VOCAB_SIZE)


def test_bottleneck_factor_below_one_lets_encoder_memory_through():
    model = build_model(cfg("latent", bottleneck_factor=0.5)).eval()
    src, _ = batch()
    memory, mask = model.memory(src)
    assert memory.shape == (4, 3 + 7, 32) and mask.shape == (4, 10)
    enc, _ = model.encode(src)
    assert torch.allclose(memory[:, 3:], 0.5 * enc)


@pytest.mark.parametrize("kind", ["simple", "latent"])
def test_pad_in_the_source_never_changes_the_output(kind):
    model = build_model(cfg(kind)).eval()
    src, tgt = batch(S=7)
    padded = torch.cat([src, torch.full((4, 2), PAD)], 1)  # two PAD positions more
    assert torch.allclose(model(src, tgt), model(padded, tgt), atol=1e-5)


@pytest.mark.parametrize("kind", ["simple", "latent"])
def test_what_follows_a_position_in_the_decoder_never_changes_it(kind):
    model = build_model(cfg(kind)).eval()
    src, tgt = batch()
    out = model(src, tgt)
    changed = tgt.clone()
    changed[:, 4:] = PAD  # e.g. the padding after <eos>, or any other later tokens
    out2 = model(src, changed)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-5)


def test_models_share_their_initialisation_when_seeded_alike():
    torch.manual_seed(3)
    simple = SimpleTransformer(cfg())
    torch.manual_seed(3)
    latent = LatentTransformer(cfg("latent"))
    shared = simple.state_dict()
    for k, v in shared.items():
        assert torch.equal(v, latent.state_dict()[k]), k
    assert latent.num_parameters() > simple.num_parameters()


def test_d_model_not_divisible_by_nhead_is_rejected():
    with pytest.raises(ConfigError) as e:
        cfg(d_model=30, nhead=4)
    assert e.value.field == "d_model" and "nhead" in str(e.value)


@pytest.mark.parametrize("kw, field", [(dict(num_layers=0), "num_layers"), (dict(dropout=1.0), "dropout"),
                                       (dict(bottleneck_factor=1.5), "bottleneck_factor"), (dict(num_latent=0), "num_latent"),
                                       (dict(decoder_layers=-1), "decoder_layers")])
def test_bad_model_config(kw, field):
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    assert e.value.field == field


class ScriptedModel(torch.nn.Module):
    """Emits a fixed script of tokens per row, whatever it is shown; counts decode calls."""

    def __init__(self, scripts, tgt_len=7):
        super().__init__()
        self.scripts = scripts
        self.cfg = Seq2SeqConfig(tgt_len=tgt_len)
        self.calls = 0

    def memory(self, src):
        return torch.zeros(src.shape[0], 1, 4), None

    def decoding_cache(self, memory):
        return []

    def decode_next(self, tok, t, cache, memory_mask):
        self.calls += 1
        logits = torch.zeros(tok.shape[0], VOCAB_SIZE)
        for r, script in enumerate(self.scripts):
            logits[r, script[min(t, len(script) - 1)]] = 1.0
        return logits


def test_greedy_decoding_stops_at_eos_and_pads_after_it():
    d = lambda k: DIGIT0 + k  # noqa: E731
    model = ScriptedModel([[d(1), EOS, d(9), d(9)], [d(2), d(3), d(4), EOS, d(9)]])
    out = greedy_decode(model, torch.zeros(2, 3, dtype=torch.long))
    assert model.calls == 4  # stopped as soon as the last row said <eos>, not at the cap of 7
    assert out.tolist() == [[d(1), EOS, PAD, PAD], [d(2), d(3), d(4), EOS]]


def test_greedy_decoding_is_capped_when_eos_never_comes():
    model = ScriptedModel([[DIGIT0 + 1] * 20], tgt_len=5)
    out = greedy_decode(model, torch.zeros(1, 3, dtype=torch.long))
    assert out.shape == (1, 5) and model.calls == 5


@pytest.mark.parametrize("kind", ["simple", "latent"])
def test_gradient_checkpointing_same_loss_and_gradients(kind):
    from test_chat_model import saved_for_backward

    plain = build_model(cfg(kind, dropout=0.1)).train()
    ckpt = build_model(cfg(kind, dropout=0.1, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    src, tgt = batch()
    grads, kept = [], []
    for model in (plain, ckpt):
        torch.manual_seed(1)
        out, k = saved_for_backward(lambda: model(src, tgt))
        out.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        kept.append(k)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept[1] < 0.5 * kept[0]


@pytest.mark.parametrize("kind,abacus", [("simple", False), ("latent", False), ("simple", True)])
def test_cached_decoding_gives_what_the_whole_decoder_gives(kind, abacus):
    """``decode_next`` with its cache is ``decode`` at the last position: the same logits at
    every step of a free-running decode, so greedy answers are the ones the full pass gives."""
    from test_multiply_options import abacus_config

    torch.manual_seed(0)
    model = build_model(abacus_config() if abacus else cfg(kind)).eval()
    src = torch.randint(DIGIT0, DIGIT0 + 10, (6, model.cfg.src_len))
    with torch.no_grad():
        memory, mask = model.memory(src)
        cache = model.decoding_cache(memory)
        seq = torch.full((6, 1), BOS)
        for t in range(model.cfg.tgt_len):
            step = model.decode_next(seq[:, -1], t, cache, mask)  # (B, V)
            whole = model.decode(seq, memory, mask)[:, -1]  # (B, V): every position again
            torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-5)
            seq = torch.cat([seq, whole.argmax(-1, keepdim=True)], 1)
    assert greedy_decode(model, src).shape[0] == 6
