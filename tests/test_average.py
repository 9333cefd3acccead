"""``--ema``: a moving average of the weights is what a run scores and keeps, and it survives a
resume bit for bit."""

import json

import pytest
import torch
import torch.nn as nn
from helpers import chat_train, cli_train, made_up_text, run_dir, same_training

from trainlab.engine.average import WARM, WeightAverage
from trainlab.engine.checkpoint import latest_checkpoint
from trainlab.engine.state import TRAINED

FLAGS = ["--max-digits", "2", "--dropout", "0.1", "--warmup-steps", "3", "--log-every", "3", "--eval-every", "4",
         "--save-every", "5", "--ema", "0.8"]


def test_the_average_follows_its_formula_with_a_ramped_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg = WeightAverage(model, 0.9)
    assert not avg.model.training and not any(p.requires_grad for p in avg.model.parameters())
    expected = [p.detach().clone() for p in model.parameters()]
    decays = []
    for n in range(1, 101):  # the ramp reaches 0.9 at n = 80
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))  # moves the batch norm's running statistics, which are buffers
        d = min(0.9, (1 + n) / (WARM + n))
        assert avg.current_decay() == pytest.approx(d)
        decays.append(d)
        avg.update()
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    assert decays[0] < 0.2 and decays[-1] == pytest.approx(0.9)  # young, it follows; later, it averages
    for e, a, p in zip(expected, avg.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, e)
        assert not torch.equal(a, p)
    for a, b in zip(avg.model.buffers(), model.buffers()):  # buffers are copied, not averaged
        assert torch.equal(a, b)
    assert avg.state_dict() == {"decay": 0.9, "updates": 100}
    with pytest.raises(ValueError):
        WeightAverage(model, 1.0)


def test_checkpoints_hold_the_average_as_the_model_and_the_trained_weights_beside_it(runs_dir):
    assert cli_train(runs_dir, *FLAGS, "--max-steps", "10", "--run-name", "avg") == 0
    ck = latest_checkpoint(run_dir(runs_dir, "avg") / "checkpoints")
    assert ck.step == 10 and json.loads(ck.text("config.json"))["train"]["ema"] == 0.8
    for member in ("simple", "latent"):
        average, trained = ck.tensors(f"{member}/model.pt"), ck.tensors(f"{member}/{TRAINED}")
        assert average.keys() == trained.keys()
        moved = [k for k in average if average[k].is_floating_point() and not torch.equal(average[k], trained[k])]
        assert moved, f"{member}: model.pt holds the trained weights, not their average"
        assert ck.tensors(f"{member}/train_state.pt")["average"] == {"decay": 0.8, "updates": 10}
    # without --ema a checkpoint is as before: no second copy of the weights
    assert cli_train(runs_dir, *FLAGS[:-2], "--max-steps", "3", "--run-name", "plain") == 0
    plain = latest_checkpoint(run_dir(runs_dir, "plain") / "checkpoints")
    assert not [n for n in plain.sums if n.endswith(TRAINED)]
    assert "average" not in plain.tensors("simple/train_state.pt")


def test_the_report_evaluations_and_the_loaders_use_the_average(tmp_path, runs_dir):
    """The report's whole-span loss, the last evaluation's and what generate/serve/export load
    are the average's (model.pt), not the weights the optimizer left (trained.pt)."""
    import re

    import numpy as np
    import torch.nn.functional as F

    from trainlab.chat.data import TextCorpus
    from trainlab.chat.loading import load_chat_model

    text = tmp_path / "play.txt"
    text.write_text(made_up_text(), encoding="utf-8")
    assert chat_train(runs_dir, text, "--run-name", "avg", "--max-steps", "30", "--eval-every", "30", "--lr", "0.01",
                      "--ema", "0.9") == 0
    folder = runs_dir / "chat" / "avg"
    ck = latest_checkpoint(folder / "checkpoints")
    chat = load_chat_model(ck, torch.device("cpu"))
    corpus = TextCorpus.from_text(text.read_text(encoding="utf-8"), float(ck.json("config.json")["data"]["val_fraction"]),
                                  chat.vocab)
    ctx = chat.model.cfg.context_len
    starts = np.arange(0, len(corpus.val) - ctx, ctx)

    @torch.no_grad()
    def span(model):
        b = corpus.windows("val", starts, ctx)
        return float(F.cross_entropy(model(b["x"])[0].flatten(0, 1), b["y"].flatten()))

    reported = float(re.search(r"whole val span: \*\*([\d.]+)\*\*", (folder / "report.md").read_text()).group(1))
    assert span(chat.model) == pytest.approx(reported, abs=1e-4)
    chat.model.load_state_dict(ck.tensors(f"gpt/{TRAINED}"))
    assert abs(span(chat.model) - reported) > 1e-3  # the trained weights score otherwise: the test can tell
    last_eval = ck.tensors("gpt/train_state.pt")["evals"][-1]
    best = latest_checkpoint(folder / "checkpoints" / "best")
    assert best is not None and best.meta["best"]["value"] == pytest.approx(last_eval["val_loss"])


def test_interrupt_then_resume_keeps_the_average_bit_for_bit(runs_dir, monkeypatch, capsys):
    assert cli_train(runs_dir, *FLAGS, "--max-steps", "14", "--run-name", "straight") == 0
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=7")
    assert cli_train(runs_dir, *FLAGS, "--max-steps", "14", "--run-name", "halves") == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    assert cli_train(runs_dir, "--resume", "halves") == 0
    assert "resuming run halves from step 7" in capsys.readouterr().out
    same_training(runs_dir, "straight", "halves")  # model.pt (the average), trained.pt and the update count


def test_a_rollback_takes_the_average_back_with_the_weights(runs_dir):
    """--on-spike rollback restores the last good state: the average's weights and update count too."""
    from conftest import tiny_train_config

    from trainlab.engine.member import make_member

    torch.manual_seed(0)
    m = make_member("m", nn.Linear(4, 3), tiny_train_config(runs_dir, ema=0.9, on_spike="rollback"))
    m.average.update()
    m.take_snapshot()
    kept = [p.detach().clone() for p in m.average.model.parameters()]
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    m.average.update()
    assert not torch.equal(next(m.average.model.parameters()), kept[0])
    m.rollback()
    assert all(torch.equal(a, b) for a, b in zip(m.average.model.parameters(), kept))
    assert m.average.updates == 1 and m.scored is m.average.model
