"""The optimizers: Muon's orthogonalised update, which parameters it owns, and AdamW for the rest."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainlab.chat.config import GPTConfig
from trainlab.chat.model import GPT
from trainlab.engine.optim import Muon, follow_precision, hidden_matrices, make_optimizer, orthogonalize
from trainlab.multiply.config import Seq2SeqConfig
from trainlab.multiply.models import LatentTransformer, SimpleTransformer


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_orthogonalize_keeps_the_singular_vectors_and_flattens_the_values(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25, s  # a rough orthogonalisation is all Muon needs
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    exact = u @ vh  # the nearest semi-orthogonal matrix
    assert float(torch.nn.functional.cosine_similarity(o.flatten(), exact.flatten(), dim=0)) > 0.97
    assert o.shape == g.shape and o.dtype == g.dtype


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    g = torch.randn(3, 24, 10, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 50.0, 0.01])[:, None, None]
    stacked = orthogonalize(g)
    for i in range(3):  # each matrix normalised by its own norm, not the stack's
        torch.testing.assert_close(stacked[i], orthogonalize(g[i]), rtol=1e-4, atol=1e-5)


def names_of(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_owns_the_hidden_linear_weights_only():
    gpt = GPT(GPTConfig(d_model=32, nhead=2, num_layers=2, context_len=16, vocab_size=20))
    muon = names_of(gpt, hidden_matrices(gpt))
    assert muon == {f"blocks.{i}.{w}.weight" for i in range(2) for w in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    cfg = Seq2SeqConfig(d_model=32, nhead=4, num_layers=1, num_latent=2, vocab_size=14, src_len=8, tgt_len=6)
    for cls in (SimpleTransformer, LatentTransformer):
        model = cls(cfg)
        muon = names_of(model, hidden_matrices(model))
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert muon == linear - {"head.weight"} and muon
        assert not any("emb" in n or "pos" in n or "latents" in n for n in muon)


def test_the_adamw_side_is_torchs_adamw():
    """With no hidden matrices every parameter takes the AdamW path: it must match torch's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    twin = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    twin.load_state_dict(model.state_dict())
    ours = make_optimizer(model, "muon", 0.01, 0.1, (0.9, 0.99))
    ref = make_optimizer(twin, "adamw", 0.01, 0.1, (0.9, 0.99))
    assert isinstance(ours, Muon) and isinstance(ref, torch.optim.AdamW)
    for step in range(6):
        x = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, ours), (twin, ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_muon_step_is_the_scaled_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    lin = nn.Linear(6, 12, bias=False)
    w0 = lin.weight.detach().clone()
    opt = make_optimizer(nn.Sequential(lin), "muon", 0.02, 0.1, (0.9, 0.99), momentum=0.9)
    g = torch.randn(12, 6)
    lin.weight.grad = g.clone()
    opt.step()
    # first step: buffer = g, Nesterov update = g + 0.9 g; decoupled decay first
    expected = w0 * (1 - 0.02 * 0.1) - 0.02 * 0.2 * math.sqrt(12) * orthogonalize(1.9 * g)
    torch.testing.assert_close(lin.weight.detach(), expected)
    state = opt.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer"}


def test_muon_steps_on_matrices_of_shared_and_own_shapes():
    """Same-shaped matrices are orthogonalised as one stack, and a tall matrix joins the stack
    of its transpose's shape (the (5, 8) and (8, 5) weights here): each must still get its own
    momentum and its own update, the right way round, over several steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 5, bias=False),
                          nn.Linear(5, 8, bias=False), nn.Linear(8, 3, bias=False))
    w = [m.weight.detach().clone() for m in model]
    bufs = [torch.zeros_like(x) for x in w]
    opt = make_optimizer(model, "muon", 0.03, 0.0, (0.9, 0.99), momentum=0.8)
    for step in range(3):
        grads = [torch.randn(x.shape, generator=torch.Generator().manual_seed(10 * step + i)) for i, x in enumerate(w)]
        for m, g in zip(model, grads):
            m.weight.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = 0.8 * bufs[i] + g
            w[i] = w[i] - 0.03 * 0.2 * math.sqrt(max(g.shape)) * orthogonalize(g + 0.8 * bufs[i])
    for m, x in zip(model, w):
        torch.testing.assert_close(m.weight.detach(), x, rtol=1e-4, atol=1e-5)


def test_muon_refuses_a_vector():
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1)


def test_bf16_iterations_give_the_same_update_as_fp32_roughly_and_in_the_weights_dtype():
    g = torch.randn(2, 48, 128, generator=torch.Generator().manual_seed(3))
    exact, fast = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16)
    assert fast.dtype == torch.float32 and fast.shape == g.shape
    assert float(torch.nn.functional.cosine_similarity(fast.flatten(), exact.flatten(), dim=0)) > 0.99
    assert not torch.equal(fast, exact)  # it did iterate in bf16


def test_muon_iterates_in_the_members_training_dtype():
    """The engine hands the member's autocast dtype to Muon before each update: bf16 only
    for bf16 (fp16's range is too small for the Gram matrices), fp32 for the rest."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    opt = make_optimizer(model, "muon", 0.01, 0.0, (0.9, 0.99))
    assert opt.matmul_dtype == torch.float32
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (None, torch.float32)):
        follow_precision(opt, dtype)
        assert opt.matmul_dtype == expected
    follow_precision(make_optimizer(model, "adamw", 0.01, 0.0, (0.9, 0.99)), torch.bfloat16)  # a no-op there


def test_a_bf16_step_of_the_engine_iterates_muon_in_bf16():
    from trainlab.engine.member import make_member
    from trainlab.engine.step import StepContext, member_step, settle
    from trainlab.engine.task import StepLoss
    from trainlab.engine.train_config import TrainConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 1, bias=False))

    class Task:
        def loss(self, member, model, batch, step):
            return StepLoss(model(batch["x"]).square().mean())

    for precision, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = TrainConfig(optimizer="muon", precision=precision, lr=0.01)
        m = make_member("m", model, cfg)
        member_step(m, Task(), {"x": torch.randn(4, 8)}, 0, 4, StepContext(cfg, torch.device("cpu"), lambda *a: None))
        assert m.optimizer.matmul_dtype == expected and m.step == 0 and len(m.pending) == 1  # not read yet
        settle([m], cfg, None, lambda *a: None)
        assert m.step == 1 and not m.pending


def group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_embeddings_and_an_untied_head_take_their_own_lrs(name):
    gpt = GPT(GPTConfig(d_model=32, nhead=2, num_layers=1, context_len=16, vocab_size=20, tie_weights=False))
    plain = make_optimizer(gpt, name, 0.01, 0.1, (0.9, 0.99))
    opt = make_optimizer(gpt, name, 0.01, 0.1, (0.9, 0.99), embed_lr=0.05, head_lr=0.002)
    assert len(opt.param_groups) == len(plain.param_groups) + 2
    emb, head = group_of(opt, gpt.tok.weight), group_of(opt, gpt.head.weight)
    assert emb["lr"] == 0.05 and emb["weight_decay"] == 0.0 and group_of(opt, gpt.pos.weight) is emb
    assert head["lr"] == 0.002 and head["weight_decay"] == 0.1
    body = group_of(opt, gpt.blocks[0].mlp.up.weight)
    assert body["lr"] == 0.01 and body["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(gpt.parameters()))
    # the schedule scales every group from its own peak
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert (emb["lr"], head["lr"], body["lr"]) == (0.025, 0.001, 0.005)
    del sched


def test_unset_lrs_keep_the_old_group_layout_and_a_tied_head_goes_with_the_embeddings():
    gpt = GPT(GPTConfig(d_model=32, nhead=2, num_layers=1, context_len=16, vocab_size=20, tie_weights=True))
    plain = make_optimizer(gpt, "muon", 0.01, 0.1, (0.9, 0.99))
    layout = [[id(p) for p in g["params"]] for g in plain.param_groups]
    assert [len(ids) for ids in layout] == [4, 2, 3]  # muon; the embeddings (one tied); the norms
    head_only = make_optimizer(gpt, "muon", 0.01, 0.1, (0.9, 0.99), head_lr=0.002)
    assert [[id(p) for p in g["params"]] for g in head_only.param_groups] == layout  # a tied head is no head
    opt = make_optimizer(gpt, "muon", 0.01, 0.1, (0.9, 0.99), embed_lr=0.05, head_lr=0.002)
    assert group_of(opt, gpt.head.weight)["lr"] == 0.05


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_group_lrs_are_refused(bad):
    from trainlab.config import ConfigError
    from trainlab.engine.train_config import TrainConfig

    for name in ("embed_lr", "head_lr"):
        with pytest.raises(ConfigError, match=name.replace("_", "-")):
            TrainConfig(**{name: bad})


def test_none_takes_back_a_presets_group_lr_on_the_command_line():
    import argparse

    from trainlab.config import add_flags
    from trainlab.engine.train_config import TrainConfig

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, TrainConfig, "train")
    assert vars(parser.parse_args(["--embed-lr", "none", "--head-lr", "0.003"])) == {"embed_lr": None,
                                                                                       "head_lr": 0.003}
    for bad in ("fast", "nan"):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(["--embed-lr", bad])


def _state(opt):
    return [(k, v.clone() if torch.is_tensor(v) else v) for st in opt.state.values() for k, v in sorted(st.items())]


@pytest.mark.parametrize("name", ["muon", "adamw", "sgd"])
def test_a_step_skipped_on_the_device_changes_nothing_and_a_kept_one_is_the_update(name):
    """``masked_step`` with a device-side flag: skipped (gradients zeroed, as the engine does),
    every weight and piece of optimizer state stays as it was, bit for bit (at the first step
    the state may be created, at its starting values); kept, it is the update a plain
    ``step()`` of the same optimizer makes."""
    import copy

    from trainlab.engine.optim import masked_step

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(d_model=32, nhead=2, num_layers=1, context_len=8, vocab_size=20, tie_weights=False))
    if name == "sgd":  # any other optimizer: the host decides
        opt = torch.optim.SGD(gpt.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        opt = make_optimizer(gpt, name, 0.01, 0.1, (0.9, 0.99), embed_lr=0.05)
    gpt.eval()  # no dropout: the twin's gradients are drawn alike
    twin = copy.deepcopy(gpt)
    twin_opt = type(opt)(twin.parameters(), **{k: v for k, v in opt.defaults.items() if k != "muon"}) \
        if name == "sgd" else make_optimizer(twin, name, 0.01, 0.1, (0.9, 0.99), embed_lr=0.05)
    x = torch.randint(0, 20, (2, 8))

    def grads(model, poison=False):
        model.zero_grad()
        model(x)[0].square().mean().backward()
        if poison:
            next(p for p in model.parameters()).grad.view(-1)[0] = float("nan")

    for i, skip in enumerate([True, False, False, True, False]):
        if i == 1:  # a skip before any update may create the state, at its starting values (zeros, no steps)
            assert all(not v.any() for _, v in _state(opt) if torch.is_tensor(v)) or name == "sgd"
        grads(gpt, poison=skip)
        before = ([p.detach().clone() for p in gpt.parameters()], _state(opt))
        flag = torch.tensor(skip)
        for p in gpt.parameters():
            p.grad.masked_fill_(flag, 0.0)
        masked_step(opt, flag)
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before[0], gpt.parameters())), f"weights moved at {i}"
            after = _state(opt)
            assert i == 0 or len(after) == len(before[1]) and all(
                ka == kb and (torch.equal(va, vb) if torch.is_tensor(va) else va == vb)
                for (ka, va), (kb, vb) in zip(before[1], after)), f"optimizer state moved at {i}"
            continue
        grads(twin)
        twin_opt.step()
        for a, b in zip(gpt.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
