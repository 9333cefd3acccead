"""Issue 27's options of the multiplication models: place-value (Abacus) embeddings and the
training-only running-sum loss; both off by default."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from conftest import tiny_train_config
from helpers import cli_train, run_dir, tiny_multiply

from trainlab.config import ConfigError
from trainlab.multiply.config import DIGIT0, EOS, PAD, MultiplyDataConfig, Seq2SeqConfig
from trainlab.multiply.data import encode_pairs, running_sums
from trainlab.multiply.models import build_model, greedy_decode, source_places, target_places
from trainlab.multiply.task import member_config, running_sum_loss


def random_pairs(n: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 10**w, (n,), generator=g), torch.randint(1, 10**w, (n,), generator=g)


@pytest.mark.parametrize("w", [1, 3, 4])
def test_running_sums_are_long_multiplication(w):
    """Each column's last digit is the product's digit there and its tens are the carry into
    the next column: the sums rebuild the product."""
    a, b = random_pairs(500, w)
    sums = running_sums(a, b, w)  # (B, 2w)
    assert sums.shape == (500, 2 * w) and int(sums.min()) >= 0
    assert int(sums.max()) < Seq2SeqConfig(src_len=2 * w + 1, tgt_len=2 * w + 1).running_sum_classes
    powers = 10 ** torch.arange(2 * w)
    assert torch.equal(((sums % 10) * powers).sum(1), a * b)
    da, db = [(x.unsqueeze(1) // 10 ** torch.arange(w)) % 10 for x in (a, b)]
    for p in range(2 * w):
        partial = sum(da[:, i] * db[:, p - i] for i in range(w) if 0 <= p - i < w)
        carry_in = sums[:, p - 1] // 10 if p else 0
        assert torch.equal(sums[:, p], partial + carry_in)


@pytest.mark.parametrize("order, pad", [("natural", False), ("natural", True), ("reversed", False)])
def test_each_answer_digit_is_paired_with_its_columns_running_sum(order, pad):
    a, b = random_pairs(300, 3, seed=1)
    enc = encode_pairs(a, b, 3, order, pad)
    digit = (enc["tgt_out"] >= DIGIT0) & (enc["tgt_out"] < DIGIT0 + 10)
    assert torch.equal(enc["running_sum"][digit] % 10, enc["tgt_out"][digit] - DIGIT0)
    assert int(enc["running_sum"][(enc["tgt_out"] == EOS) | (enc["tgt_out"] == PAD)].abs().sum()) == 0
    sums = running_sums(a, b, 3)
    if order == "reversed":  # the first answer digit is the units column
        assert torch.equal(enc["running_sum"][:, 0], sums[:, 0])
    elif pad:  # the first is the 10^5 column, whatever the product
        assert torch.equal(enc["running_sum"][:, 0], sums[:, 5])


def test_place_values_of_the_source_and_the_answer():
    assert source_places(3).tolist() == [2, 1, 0, 6, 2, 1, 0]  # 6: the place of '*', none
    assert target_places(3, "msd", 7).tolist() == [5, 4, 3, 2, 1, 0, 6]  # the last position writes <eos>
    assert target_places(3, "lsd", 7).tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        target_places(3, "none", 7)


def abacus_config(**kw) -> Seq2SeqConfig:
    data = MultiplyDataConfig(min_digits=1, max_digits=3, answer_pad=True)
    return member_config(Seq2SeqConfig(d_model=32, nhead=4, num_layers=1, abacus=True, **kw), "simple", data)


def test_the_same_place_gets_the_same_vector_in_both_operands_and_the_answer():
    """The place table's row k is added exactly where a, b or the answer holds place 10^k."""
    torch.manual_seed(0)
    cfg = abacus_config()
    assert cfg.answer_places == "msd"
    model = build_model(cfg).eval()
    seen = {}
    model.encoder[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("src", args[0].clone()))
    model.decoder[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("tgt", args[0].clone()))
    enc = encode_pairs(torch.tensor([123]), torch.tensor([45]), 3, "natural", True)
    model(enc["src"], enc["tgt_in"])
    before = dict(seen)
    with torch.no_grad():
        model.place_emb.weight[1] += 1.0  # the tens place
    model(enc["src"], enc["tgt_in"])
    moved_src = (seen["src"] - before["src"]).abs().sum(-1)[0] > 0  # (S,)
    moved_tgt = (seen["tgt"] - before["tgt"]).abs().sum(-1)[0] > 0  # (T,)
    assert moved_src.tolist() == [False, True, False, False, False, True, False]  # a's and b's tens digit
    assert moved_tgt.tolist() == [False, False, False, False, True, False, False]  # where the tens digit is written


def test_abacus_needs_a_fixed_place_per_answer_position(runs_dir, capsys):
    """Natural order without padding: an answer position's place is the answer's length, which
    inference must not know; refused in one line before anything is written."""
    with pytest.raises(ConfigError, match="abacus"):
        member_config(Seq2SeqConfig(abacus=True), "simple", MultiplyDataConfig())
    assert member_config(Seq2SeqConfig(abacus=True), "latent",
                         MultiplyDataConfig(answer_order="reversed")).answer_places == "lsd"
    assert cli_train(runs_dir, "--abacus", "--run-name", "no") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--abacus" in err[0] and "--answer-pad" in err[0], err
    assert not run_dir(runs_dir, "no").exists()
    assert cli_train(runs_dir, "--carry-loss", "-1", "--run-name", "neg") == 2
    assert "--carry-loss" in capsys.readouterr().err and not run_dir(runs_dir, "neg").exists()


def test_the_options_are_off_by_default_and_build_the_models_as_before():
    torch.manual_seed(0)
    plain = build_model(Seq2SeqConfig(d_model=32, nhead=4, num_layers=1))
    assert not any(n.startswith(("place_emb", "sum_head")) for n in plain.state_dict())
    # a model_config.json from before the options (no such keys) builds the same config
    old = {k: v for k, v in asdict(Seq2SeqConfig()).items() if k not in ("abacus", "carry_loss", "answer_places")}
    assert Seq2SeqConfig(**old) == Seq2SeqConfig()


def test_the_running_sum_loss_is_weighted_in_and_leaves_inference_alone(runs_dir):
    train = tiny_train_config(runs_dir, max_steps=1)
    task, _ = tiny_multiply(train, min_digits=1, max_digits=2, carry_loss=0.5)
    model = task.build_models()["simple"]
    batch = task.batch(0)
    assert batch["running_sum"].shape == batch["tgt_out"].shape
    out = task.loss("simple", model, batch, 0)
    logits, sums = model(batch["src"], batch["tgt_in"], running_sums=True)
    aux = running_sum_loss(sums, batch["running_sum"], batch["tgt_out"])  # (B,)
    plain, _ = task.criterion(logits, batch["tgt_out"])
    assert float(out.stats["running_sum_loss"]) == pytest.approx(float(aux.detach().mean()))
    assert float(out.loss) == pytest.approx(float(plain) + 0.5 * float(aux.mean()), rel=1e-5)  # seq weights 1 here
    out.loss.backward()
    assert float(model.sum_head.weight.grad.abs().sum()) > 0
    # answers come from the token head alone: the running-sum head's weights change nothing
    model.eval()
    src = batch["src"][:16]
    before = greedy_decode(model, src)
    with torch.no_grad():
        model.sum_head.weight.normal_()
    assert torch.equal(greedy_decode(model, src), before)
    with pytest.raises(ValueError, match="carry_loss"):
        build_model(Seq2SeqConfig(d_model=32, nhead=4, num_layers=1))(src, batch["tgt_in"][:16], running_sums=True)


def test_a_run_with_both_options_resumes_bit_for_bit_and_answers(runs_dir, monkeypatch, capsys):
    from helpers import assert_same_tensors, final_state

    from trainlab.cli import main
    from trainlab.engine import faults

    flags = ["--min-digits", "1", "--max-digits", "2", "--answer-pad", "--abacus", "--carry-loss", "1",
             "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--precision", "fp32"]
    assert cli_train(runs_dir, *flags, "--run-name", "straight") == 0
    saved = json.loads(next(run_dir(runs_dir, "straight").glob("checkpoints/step_*/latent/model_config.json"))
                       .read_text())
    assert saved["abacus"] is True and saved["carry_loss"] == 1 and saved["answer_places"] == "msd"
    monkeypatch.setenv(faults.ENV, "interrupt=4")
    assert cli_train(runs_dir, *flags, "--run-name", "broken") == 130
    monkeypatch.delenv(faults.ENV)
    assert cli_train(runs_dir, "--resume", "broken") == 0
    (step_a, a), (step_b, b) = final_state(runs_dir, "straight"), final_state(runs_dir, "broken")
    assert step_a == step_b == 6 and a.keys() == b.keys()
    for m in ("simple", "latent"):
        assert any(k.startswith("place_emb") for k in a[f"{m}/model.pt"])
        assert any(k.startswith("sum_head") for k in a[f"{m}/model.pt"])
    for name in a:  # weights, optimizer and schedule state and losses (wall times aside)
        keep = ("optimizer", "scheduler", "step", "examples", "losses")
        x, y = ({k: v for k, v in s[name].items() if k in keep} if name.endswith("train_state.pt") else s[name]
                for s in (a, b))
        assert_same_tensors(x, y, name)
    capsys.readouterr()
    assert main(["multiply", "ask", "straight", "12*34", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "12*34 = 408" in out and all(name in out for name in ("simple", "latent"))
