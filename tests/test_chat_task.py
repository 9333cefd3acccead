"""ChatGoT on the shared engine: learning, checkpoints, exact resume, samples, the CLI."""

from __future__ import annotations

import io
import json
import math

import pytest
from helpers import assert_same_tensors, chat_resume, chat_train, made_up_text, tb_scalars

from trainlab.chat.task import auto_temperature, detect_speakers
from trainlab.cli import main
from trainlab.engine import faults
from trainlab.engine.checkpoint import latest_checkpoint


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(made_up_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One tiny model trained on the made-up play, shared by the tests that use a trained model."""
    from conftest import register_runs_dir

    root = tmp_path_factory.mktemp("learned")
    path = root / "play.txt"
    path.write_text(made_up_text(), encoding="utf-8")
    runs = register_runs_dir(root / "runs")
    assert chat_train(runs, path, "--run-name", "learn", "--max-steps", "300", "--eval-every", "100",
                      "--sample-every", "300", "--lr", "0.01") == 0
    return runs, path


def newest(runs, name):
    return latest_checkpoint(runs / "chat" / name / "checkpoints")


def test_a_tiny_model_learns_a_made_up_play(learned, capsys):
    runs_dir, corpus = learned
    ck = newest(runs_dir, "learn")
    evals = ck.tensors("gpt/train_state.pt")["evals"]
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert last < 0.45 * math.log(ck.json("gpt/model_config.json")["vocab_size"]) and last < first
    # the checkpoint stands alone: vocabulary, corpus facts and dialogue style beside the weights
    vocab = json.loads(ck.text("vocab.json"))["chars"]
    assert vocab == "".join(sorted(set(corpus.read_text(encoding="utf-8"))))
    facts = ck.json("corpus.json")
    assert facts["dialogue"]["style"] == "block" and set(facts["dialogue"]["speakers"]) == {"ANNA", "BORIS", "CLARA"}
    capsys.readouterr()
    assert main(["chat", "generate", "--checkpoint", "learn", "--runs-dir", str(runs_dir), "--prompt", "BORIS:\nBring",
                 "--temperature", "0", "--max-new-tokens", "20", "--stop-at", "line", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "BORIS:\nBring the red lamp.\n"
    # the best checkpoint, and a checkpoint folder given by path, work the same way
    for ref in (["learn", "--best"], [str(ck.path)]):
        assert main(["chat", "generate", "--checkpoint", *ref, "--runs-dir", str(runs_dir), "--prompt", "ANNA:\nWe",
                     "--temperature", "0", "--max-new-tokens", "20", "--stop-at", "sentence", "--device", "cpu"]) == 0
        assert capsys.readouterr().out == "ANNA:\nWe sail at noon.\n"


@pytest.mark.parametrize("optimizer, windows", [("adamw", "random"), ("muon", "random"), ("muon", "shuffled")])
def test_resume_after_an_interrupt_equals_an_unbroken_run(runs_dir, corpus, monkeypatch, optimizer, windows):
    flags = ["--max-steps", "12", "--eval-every", "4", "--sample-every", "3", "--save-every", "5", "--log-every", "2",
             "--dropout", "0.1", "--optimizer", optimizer, "--windows", windows]
    assert chat_train(runs_dir, corpus, "--run-name", "straight", *flags) == 0
    monkeypatch.setenv(faults.ENV, "interrupt=7")
    assert chat_train(runs_dir, corpus, "--run-name", "broken", *flags) == 130
    monkeypatch.delenv(faults.ENV)
    assert chat_resume(runs_dir, "broken") == 0
    a, b = newest(runs_dir, "straight"), newest(runs_dir, "broken")
    assert a.step == b.step == 12
    assert_same_tensors(a.tensors("gpt/model.pt"), b.tensors("gpt/model.pt"), "weights")
    sa, sb = a.tensors("gpt/train_state.pt"), b.tensors("gpt/train_state.pt")
    for key in ("optimizer", "scheduler", "step", "examples", "losses"):  # not wall-clock seconds
        assert_same_tensors(sa[key], sb[key], key)
    for tag in ("train/loss", "val/val_loss", "samples/temperature", "samples/distinct_2"):
        straight = tb_scalars(runs_dir / "chat" / "straight" / "gpt", tag)
        resumed = tb_scalars(runs_dir / "chat" / "broken" / "gpt", tag)
        if tag.startswith("val"):  # Ctrl+C evaluates at the stop step: one extra point, nothing else
            resumed = [p for p in resumed if p[0] != 7]
        assert straight == resumed, tag


def test_the_best_checkpoint_belongs_to_the_run_as_it_now_stands(runs_dir, corpus, capsys):
    """A best saved after the step training goes on from is from a history that no longer
    exists. A resume from an older checkpoint (the newer ones lost) and a restart from step 0
    each end with the best of the run as it now stands, where the old best would win by step."""
    import shutil

    from trainlab.engine.checkpoint import Checkpoint, list_checkpoints

    flags = ["--max-steps", "12", "--eval-every", "2", "--save-every", "2", "--keep-checkpoints", "10",
             "--sample-every", "0", "--lr", "0.01"]
    assert chat_train(runs_dir, corpus, "--run-name", "b", *flags) == 0
    ckpts = runs_dir / "chat" / "b" / "checkpoints"

    def best_and_evals():
        (path,) = list_checkpoints(ckpts / "best")  # one best, never two
        evals = newest(runs_dir, "b").tensors("gpt/train_state.pt")["evals"]
        return Checkpoint(path), {e["step"]: e["val_loss"] for e in evals}

    best, losses = best_and_evals()
    assert best.step == 12 and best.meta["best"]["value"] == pytest.approx(min(losses.values()))
    for old in ("step_0000008", "step_0000010", "step_0000012"):
        shutil.rmtree(ckpts / old)
    capsys.readouterr()
    assert chat_resume(runs_dir, "b", "--max-steps", "8") == 0
    best, losses = best_and_evals()
    assert max(losses) == 8 and best.step <= 8
    assert best.meta["best"]["value"] == pytest.approx(min(losses.values()))
    assert "best checkpoint step_0000012 removed" in capsys.readouterr().out
    assert best.tensors("gpt/model.pt")  # a whole checkpoint, verified

    for old in list_checkpoints(ckpts):  # every step checkpoint lost: the run starts over from step 0
        shutil.rmtree(old)
    assert chat_resume(runs_dir, "b", "--max-steps", "4") == 0
    best, losses = best_and_evals()
    assert sorted(losses) == [2, 4] and best.step <= 4
    assert best.meta["best"]["value"] == pytest.approx(min(losses.values()))


def test_the_modern_block_resumes_as_if_unbroken_and_keeps_its_block(runs_dir, corpus, monkeypatch, capsys):
    flags = ["--max-steps", "8", "--eval-every", "4", "--save-every", "3", "--positions", "rotary", "--norm", "rmsnorm",
             "--mlp", "swiglu", "--qk-norm", "--zero-init", "--schedule", "wsd", "--precision", "fp32",
             "--pair-embedding", "--no-tie-weights", "--embed-lr", "0.02", "--head-lr", "0.003"]
    assert chat_train(runs_dir, corpus, "--run-name", "m-straight", *flags) == 0
    monkeypatch.setenv(faults.ENV, "interrupt=5")
    assert chat_train(runs_dir, corpus, "--run-name", "m-broken", *flags) == 130
    monkeypatch.delenv(faults.ENV)
    capsys.readouterr()
    assert chat_resume(runs_dir, "m-broken", "--positions", "learned", "--mlp", "gelu") == 0
    err = capsys.readouterr().err
    assert "--positions learned ignored: run m-broken was made with 'rotary'" in err and "--mlp gelu ignored" in err
    a, b = newest(runs_dir, "m-straight"), newest(runs_dir, "m-broken")
    assert a.step == b.step == 8 and b.json("gpt/model_config.json")["positions"] == "rotary"
    assert b.json("gpt/model_config.json")["pair_embedding"] is True
    assert (b.json("config.json")["train"]["embed_lr"], b.json("config.json")["train"]["head_lr"]) == (0.02, 0.003)
    assert_same_tensors(a.tensors("gpt/model.pt"), b.tensors("gpt/model.pt"), "weights")
    # it generates past its context, the window sliding (rotary positions restart with it)
    capsys.readouterr()
    assert main(["chat", "generate", "--checkpoint", "m-broken", "--runs-dir", str(runs_dir), "--max-new-tokens",
                 "100", "--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out) > 90  # the tiny preset's context is 32


def test_samples_reach_tensorboard_as_text(runs_dir, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert chat_train(runs_dir, corpus, "--run-name", "s", "--max-steps", "4", "--sample-every", "2") == 0
    acc = EventAccumulator(str(runs_dir / "chat" / "s" / "gpt"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("samples/text/text_summary")
    assert [e.step for e in texts] == [2, 4]
    assert "sample:" in texts[0].tensor_proto.string_val[0].decode()
    assert [s for s, _ in tb_scalars(runs_dir / "chat" / "s" / "gpt", "samples/repeat_4")] == [2, 4]


def test_a_changed_corpus_is_refused_but_a_moved_one_is_fine(runs_dir, corpus, tmp_path, capsys):
    assert chat_train(runs_dir, corpus, "--run-name", "c", "--max-steps", "4") == 0
    moved = tmp_path / "moved.txt"
    moved.write_bytes(corpus.read_bytes())
    assert chat_resume(runs_dir, "c", "--text", str(moved), "--max-steps", "6") == 0
    assert newest(runs_dir, "c").step == 6
    moved.write_text(made_up_text(seed=1), encoding="utf-8")  # same characters, other text
    capsys.readouterr()
    assert chat_resume(runs_dir, "c", "--text", str(moved), "--max-steps", "8") == 2
    err = capsys.readouterr().err.strip()
    assert "corpus.json differs" in err and len(err.splitlines()) == 1
    assert newest(runs_dir, "c").step == 6


@pytest.mark.parametrize("flags, message", [
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--context-len", "0"], "--context-len"),
    (["--sample-temperature", "warm"], "--sample-temperature"),
    (["--preset", "chatgot-huge"], "--preset"),
    (["--nhead", "5"], "--d-model"),
    (["--windows", "sorted"], "--windows"),
])
def test_bad_flags_are_one_line_and_leave_nothing(runs_dir, corpus, capsys, flags, message):
    assert chat_train(runs_dir, corpus, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (runs_dir / "chat").exists()


def test_bad_corpus_is_one_line_and_leaves_nothing(runs_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("ANNA:\nHi.\n", encoding="utf-8")
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    for path, message in ((short, "too short"), (binary, "not UTF-8"), (tmp_path / "none.txt", "cannot read")):
        assert chat_train(runs_dir, path) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["chat", "train", "--runs-dir", str(runs_dir), "--tag", "test"]) == 2
    assert "--text: required" in capsys.readouterr().err
    assert not (runs_dir / "chat").exists()


def test_repl_answers_in_the_corpus_style_through_its_input_stream(learned):
    import torch

    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.loading import load_chat_model
    from trainlab.chat.repl import default_dialogue, repl

    cm = load_chat_model(newest(learned[0], "learn"), torch.device("cpu"))
    dialogue = default_dialogue(cm.dialogue, None, "CLARA", "BORIS")
    assert (dialogue.style, dialogue.stop_at) == ("block", "paragraph")
    out, warnings = io.StringIO(), []
    inp = io.StringIO("Is the door shut?\nNo fox é here\n/reset\n/quit\nnever read\n")
    cfg = SamplingConfig(temperature=0, max_new_tokens=60)
    assert repl(cm, dialogue, cfg, torch.Generator(), inp, out, warnings.append) == 0
    text = out.getvalue()
    replies = [line for line in text.splitlines() if line.startswith("CLARA: BORIS: ")]
    assert len(replies) == 2, text
    assert all(r[len("CLARA: BORIS: "):] in ("Bring the red lamp.", "Nobody saw the fox.") for r in replies), replies
    assert "(conversation forgotten)" in text and "never read" not in text
    assert warnings == ["warning: dropped 1 character the model never saw: 'é'"]


def test_repl_command_reads_stdin(runs_dir, corpus, capsys, monkeypatch):
    assert chat_train(runs_dir, corpus, "--run-name", "cmd", "--max-steps", "2") == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    capsys.readouterr()
    assert main(["chat", "repl", "--checkpoint", "cmd", "--runs-dir", str(runs_dir), "--device", "cpu",
                 "--style", "inline", "--user-name", "ANNA", "--bot-name", "BORIS", "--seed", "0",
                 "--max-new-tokens", "5", "--decode", "plain"]) == 0
    out = capsys.readouterr().out
    assert "chatting as ANNA with BORIS (inline turns)" in out and "ANNA: BORIS: " in out
    assert main(["chat", "repl", "--checkpoint", "cmd", "--runs-dir", str(runs_dir), "--bot-name", "A:B"]) == 2


def test_auto_temperature_cools_as_the_model_improves():
    points = [auto_temperature(x) for x in (math.log(65), 3.0, 2.0, 1.5, 1.0, 0.2)]
    assert points[0] == 1.0 and points[-1] == 0.7
    assert all(a >= b for a, b in zip(points, points[1:])) and points[2] > points[4]
    assert auto_temperature(None) == 1.0 and auto_temperature(float("nan")) == 1.0


def test_dialogue_style_detection():
    assert detect_speakers("ANNA: hi\nBORIS: yo\nANNA: ok\n")["style"] == "inline"
    block = detect_speakers(made_up_text(20))
    assert block["style"] == "block" and len(block["speakers"]) == 3
    assert detect_speakers("just some prose, no speakers at all.")["style"] == "none"


def test_shuffled_windows_are_a_function_of_the_step_across_passes():
    """Each pass reads every window once; a task built afresh (a resumed run) reads the same
    windows at any step as one that read every step before it."""
    import numpy as np

    from trainlab.chat.config import ChatTaskConfig, GPTConfig
    from trainlab.chat.data import TextCorpus
    from trainlab.chat.task import ChatTask
    from trainlab.engine.train_config import TrainConfig

    corpus = TextCorpus.from_text(made_up_text(), val_fraction=0.1)
    model = GPTConfig(d_model=16, nhead=2, num_layers=1, context_len=32, vocab_size=corpus.vocab.size)
    train = TrainConfig(max_steps=100, batch_size=10, seed=3)
    straight = ChatTask(corpus, model, ChatTaskConfig(windows="shuffled"), train)
    k, _ = corpus.pass_windows("train", 32)
    steps = 2 * k // 10 + 2  # past the end of the second pass
    starts = np.concatenate([straight.shuffled_starts(s * 10, 10) for s in range(steps)])
    first, second = starts[:k], starts[k:2 * k]
    assert len(set(first.tolist())) == k and len(set(second.tolist())) == k  # no window twice in a pass
    assert set(first.tolist()) != set(second.tolist())  # a new offset each pass
    rows = [straight.batch(s)["x"] for s in range(steps)]
    for s in (3, k // 10):
        assert np.array_equal(rows[s], corpus.windows("train", starts[s * 10:s * 10 + 10], 32)["x"])
    fresh = ChatTask(corpus, model, ChatTaskConfig(windows="shuffled"), train)
    for s in (steps - 1, k // 10, 0):  # out of order, across a pass boundary
        assert np.array_equal(fresh.batch(s)["x"], rows[s])
    other_seed = ChatTask(corpus, model, ChatTaskConfig(windows="shuffled"), TrainConfig(max_steps=100, batch_size=10))
    assert not np.array_equal(other_seed.shuffled_starts(0, k), first)
