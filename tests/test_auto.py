"""--preset auto --minutes M: the chat recipe chosen by this machine's measured pace (auto.py)."""

from __future__ import annotations

import json
import re
import time

import pytest
from helpers import made_up_text

from trainlab import auto, runs
from trainlab.config import ConfigError
from trainlab.engine import budget as engine_budget
from trainlab.engine.precision import pick_precision


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(made_up_text(2000), encoding="utf-8")
    return path


def fake_paces(monkeypatch, paces: dict) -> list:
    """Every recipe's seconds a step by its width, or by (width, context) where given, without
    training; returns the keys timed (a context-256 recipe as (width, 256))."""
    timed: list = []

    def fake(task, cfg, device=None, n=10, warmup=5, known=None):
        m = task.model_cfg
        key = next(k for k in ((m.d_model, m.context_len), m.d_model) if k in paces)
        timed.append(key)
        return paces[key], "fp32", {"fp32": paces[key]}

    monkeypatch.setattr("trainlab.engine.step.fitted_seconds_per_step", fake)
    return timed


# widths: chat-quick 128, chat-1min 192, chat-1min-dropout (192, 256) at batch 8 (about half the step of the others at
# its width), chat-5min and chat-5min-dropout (192, 128),
# chat-20min 256 (chat-20min-ctx256: (256, 256)), chatgot-14m 384
LAPTOP = {128: 0.03, 192: 0.12, (192, 256): 0.07, (192, 128): 0.25, 256: 0.4, (256, 256): 0.5, 384: 3.0}


def test_the_budget_chooses_the_recipe_and_larger_ones_are_timed_only_when_in_reach(monkeypatch, corpus):
    names = [c.preset for c in auto.CANDIDATES["chat"]]
    assert names == ["chat-quick", "chat-1min", "chat-1min-dropout", "chat-5min", "chat-5min-dropout", "chat-20min",
                     "chat-20min-ctx256", "chatgot-14m"]
    sizes = [auto.flops_per_char(runs.settings("chat", n, flags={"text": str(corpus)})) for n in names]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 50  # the list goes up in cost

    timed = fake_paces(monkeypatch, LAPTOP)
    flags = {"text": str(corpus), "minutes": 1.0}
    name, record = auto.choose("chat", None, flags, time.monotonic(), echo=lambda s: None)
    # 0.85 x 60 s / 0.12 s x 4,096 characters = 1.7M >= chat-1min's 0.6M, 30 passes over this small
    # text, so chat-1min-dropout is timed (same pace) and taken; chat-5min's bound (that pace scaled
    # by FLOPs, halved) falls short of its 5M, so it is never timed
    assert name == "chat-1min-dropout" and timed == [128, 192, (192, 256)]
    probes = record["auto"]["probes"]
    assert [p["preset"] for p in probes] == ["chat-quick", "chat-1min", "chat-1min-dropout", "chat-5min"]
    assert probes[-1]["seconds_per_step"] is None and probes[-1]["chars"] < probes[-1]["from_chars"]

    timed.clear()
    name, record = auto.choose("chat", None, {**flags, "minutes": 20.0}, time.monotonic(), echo=lambda s: None)
    # context 256 reads 0.85 x 1,200 s / 0.5 s x 4,096 = 8.4M >= 6M; the 14M model's bound is far short of 40M.
    # chat-5min would read this small text hundreds of times, so its dropout-0.1 form is timed too
    assert name == "chat-20min-ctx256" and timed == [128, 192, (192, 256), (192, 128), (192, 128), 256, (256, 256)]
    slow = fake_paces(monkeypatch, {**LAPTOP, 256: 0.8, (256, 256): 1.0})  # fp32 on a CPU with bf16
    name, record = auto.choose("chat", None, {**flags, "minutes": 20.0}, time.monotonic(), echo=lambda s: None)
    # chat-20min reads 5.2M, short of its 7M: chat-5min in its form for many passes, and context 256 is never timed
    assert name == "chat-5min-dropout" and slow == [128, 192, (192, 256), (192, 128), (192, 128), 256]
    assert record["auto"]["probes"][-1]["preset"] == "chat-20min"
    timed = fake_paces(monkeypatch, LAPTOP)
    timed.clear()
    name, _ = auto.choose("chat", None, {**flags, "minutes": 0.15}, time.monotonic(), echo=lambda s: None)
    assert name == "chat-quick" and timed == [128]  # even chat-1min's bound is short of 0.6M in 9 s

    fake_paces(monkeypatch, {w: 0.004 for w in LAPTOP})  # a GPU: every step a few milliseconds
    said: list[str] = []
    name, record = auto.choose("chat", None, {**flags, "minutes": 20.0}, time.monotonic(), echo=said.append)
    assert name == "chatgot-14m" and len(said) == 1 and said[0].startswith("--preset auto: chatgot-14m")
    assert record["auto"]["timings"] == {"fp32": 0.004}  # the chosen recipe's, for the run to decide by


def test_a_recipe_is_passed_over_until_the_one_before_it_has_run_out_of_text(monkeypatch, tmp_path, corpus):
    big = tmp_path / "big.txt"
    big.write_text(corpus.read_text(encoding="utf-8") * 50, encoding="utf-8")  # 2.8M characters
    paces = {128: 0.03, 192: 0.03, (192, 256): 0.016, (192, 128): 0.1, 256: 0.1, 384: 3.0}
    timed = fake_paces(monkeypatch, paces)
    said: list[str] = []
    # chat-1min reads 0.85 x 60 s / 0.03 s x 4,096 = 7M characters: 3 passes over the big text, 140
    # over the small. Over the big one, both recipes that wait for 4 passes are passed over, and
    # chat-20min's bound (chat-1min's pace scaled by FLOPs, halved) is short of its 4.2M
    name, record = auto.choose("chat", None, {"text": str(big), "minutes": 1.0}, time.monotonic(), echo=said.append)
    assert name == "chat-1min" and timed == [128, 192]
    assert re.search(r"chat-1min-dropout only once chat-1min would read its text 4 times \(2\.\d here\)", said[0])
    assert re.search(r"chat-5min only once chat-1min would read its text 4 times \(2\.\d here\)", said[0])
    assert re.search(r"chat-20min would train on [\d.]+M of the 7M it needs \(bound, not timed\)", said[0])
    over = record["auto"]["passed_over"]
    assert [o["preset"] for o in over] == ["chat-1min-dropout", "chat-5min", "chat-5min-dropout"]
    assert over[0]["after"] == "chat-1min" and 2.5 < over[0]["passes"] < 3
    assert 2e6 < record["auto"]["text_chars"] < 3e6  # 90% of the text
    timed.clear()
    name, _ = auto.choose("chat", None, {"text": str(corpus), "minutes": 1.0}, time.monotonic(), echo=said.append)
    assert name == "chat-1min-dropout" and timed == [128, 192, (192, 256), (192, 128)]  # chat-1min used up

    # a CPU without native bf16 at 20 minutes on a text of tinyshakespeare's size (1M characters to
    # train on): chat-1min would read it 6 times, chat-5min 2.2M characters: the 2-layer model with dropout
    shakespeare = tmp_path / "one-million.txt"
    shakespeare.write_text(corpus.read_text(encoding="utf-8") * 20, encoding="utf-8")
    avx2 = fake_paces(monkeypatch, {128: 0.12, 192: 0.7, (192, 256): 0.43, (192, 128): 1.9, 256: 3.2, (256, 256): 3.8,
                                    384: 20.0})
    name, record = auto.choose("chat", None, {"text": str(shakespeare), "minutes": 20.0}, time.monotonic(),
                               echo=lambda s: None)
    assert name == "chat-1min-dropout" and avx2 == [128, 192, (192, 256), (192, 128)]
    assert record["auto"]["passed_over"] == []

    # chat-5min's dropout by the passes it gets: about 6 at 5 minutes with native bf16 (0.05 ahead),
    # 8 or more (as estimated) at 20 in fp32 on the same CPU (0.1 ahead, chat-5min-dropout)
    paces = {128: 0.02, 192: 0.06, (192, 256): 0.035, (192, 128): 0.17, 256: 0.3, (256, 256): 0.35, 384: 5.0}
    bf16 = fake_paces(monkeypatch, paces)
    said.clear()
    name, record = auto.choose("chat", None, {"text": str(shakespeare), "minutes": 5.0}, time.monotonic(),
                               echo=said.append)
    assert name == "chat-5min" and bf16 == [128, 192, (192, 256), (192, 128), 256]
    assert [o["preset"] for o in record["auto"]["passed_over"]] == ["chat-5min-dropout"]
    assert re.search(r"chat-5min-dropout only once chat-5min would read its text 8 times \(6(\.\d)? here\)", said[0])
    fp32 = fake_paces(monkeypatch, {**paces, (192, 128): 0.35, 256: 0.8, (256, 256): 1.0})
    name, record = auto.choose("chat", None, {"text": str(shakespeare), "minutes": 20.0}, time.monotonic(),
                               echo=lambda s: None)
    assert name == "chat-5min-dropout" and fp32 == [128, 192, (192, 256), (192, 128), (192, 128), 256]


def test_once_bf16_wins_the_larger_recipes_are_timed_in_it_alone(monkeypatch, corpus):
    """Timing fp32 beside bf16 for every recipe cost about half of a 15 s probe at 5 minutes; a
    larger recipe's matmuls gain more from bf16 than a smaller one's, so its win carries up."""
    timed: list = []

    def fake(task, cfg, device=None, n=10, warmup=5, known=None):
        width = task.model_cfg.d_model
        both = {"fp32": 0.01 * width / 128, "bf16": ratio[width] * 0.01 * width / 128}
        timings = {known: both[known]} if known else both
        timed.append((width, tuple(timings)))
        pick = pick_precision(timings)
        return timings[pick], pick, timings

    monkeypatch.setattr("trainlab.engine.step.fitted_seconds_per_step", fake)
    ratio = {128: 0.6, 192: 0.5, 256: 0.4, 384: 0.4}  # bf16 wins from the first recipe on
    name, record = auto.choose("chat", None, {"text": str(corpus), "minutes": 1.0}, time.monotonic(),
                               echo=lambda s: None)
    assert timed[0] == (128, ("fp32", "bf16")) and len(timed) > 1
    assert all(t == ("bf16",) for _, t in timed[1:])
    assert name != "chat-quick" and list(record["auto"]["timings"]) == ["bf16"]  # the run decides by it
    timed.clear()
    ratio = {128: 0.97, 192: 0.5, 256: 0.4, 384: 0.4}  # fp32 keeps chat-quick: the next is timed in both
    auto.choose("chat", None, {"text": str(corpus), "minutes": 1.0}, time.monotonic(), echo=lambda s: None)
    assert [t for _, t in timed[:3]] == [("fp32", "bf16"), ("fp32", "bf16"), ("bf16",)]


def test_flags_and_files_apply_to_every_recipe_timed(monkeypatch, corpus):
    seen = []

    def fake(task, cfg, device=None, n=10, warmup=5, known=None):
        seen.append((cfg.precision, cfg.max_steps))
        return 0.01, cfg.precision, {cfg.precision: 0.01}

    monkeypatch.setattr("trainlab.engine.step.fitted_seconds_per_step", fake)
    auto.choose("chat", None, {"text": str(corpus), "minutes": 1.0, "precision": "fp32"}, time.monotonic(),
                echo=lambda s: None)
    assert seen and all(s == ("fp32", 1) for s in seen)


def test_auto_is_refused_without_minutes_for_multiply_and_under_torchrun(monkeypatch, corpus):
    with pytest.raises(ConfigError, match="give --minutes"):
        auto.choose("chat", None, {"text": str(corpus)}, time.monotonic())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="positive number of minutes"):
            auto.choose("chat", None, {"text": str(corpus), "minutes": bad}, time.monotonic())
    with pytest.raises(ConfigError, match="chooses among chat's recipes"):
        auto.choose("multiply", None, {"minutes": 1.0}, time.monotonic())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="under torchrun"):
        auto.choose("chat", None, {"text": str(corpus), "minutes": 1.0}, time.monotonic())


@pytest.mark.parametrize("flags, needle", [
    ([], "give --minutes M"),
    (["--minutes", "1", "--max-steps", "10"], "both --max-steps and --minutes"),
])
def test_the_command_line_refuses_auto_in_one_line(tmp_path, capsys, corpus, flags, needle):
    from trainlab.cli import main

    runs_dir = tmp_path / "runs"
    code = main(["chat", "train", "--preset", "auto", "--text", str(corpus), "--runs-dir", str(runs_dir), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1
    assert not runs_dir.exists()  # nothing written
    code = main(["multiply", "train", "--preset", "auto", "--minutes", "1", "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "chooses among chat's recipes" in err and len(err.splitlines()) == 1


def test_an_auto_run_records_its_choice_and_fits_the_chosen_recipe_to_the_minutes(monkeypatch, tmp_path, capsys,
                                                                                 corpus):
    from trainlab.cli import main

    monkeypatch.setattr(engine_budget, "process_age", lambda: 0.0)
    # two real recipes, timed for real: the tiny one and a second that needs more than any budget here
    # (the tiny one again: chat-quick's probe in emulated bf16, the suite's second pass on an AVX2
    # CPU, took most of the 9 s and the run was refused)
    monkeypatch.setattr(auto, "EFFICIENCY_ALLOWANCE", 1e9)  # no bound: the second recipe is timed for real
    monkeypatch.setitem(auto.CANDIDATES, "chat", (auto.Candidate("chatgot-tiny", 0.0, "test"),
                                                  auto.Candidate("chatgot-tiny", 1e12, "test")))
    runs_dir = tmp_path / "runs"
    code = main(["chat", "train", "--preset", "auto", "--minutes", "0.15", "--text", str(corpus), "--runs-dir",
                 str(runs_dir), "--run-name", "a", "--no-progress", "--tag", "test", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "--preset auto: chatgot-tiny for 0.15 minutes" in out
    info = json.loads((runs_dir / "chat" / "a" / "run.json").read_text())
    assert info["auto"]["preset"] == "chatgot-tiny" and info["config"]["model"]["d_model"] == 32
    assert [p["preset"] for p in info["auto"]["probes"]] == ["chatgot-tiny", "chatgot-tiny"]
    assert info["auto"]["probes"][1]["from_chars"] == 1e12
    assert info["auto"]["probes"][1]["seconds_per_step"] > 0  # timed, and short of its threshold
    assert info["budget"]["steps"] == info["step"] and info["config"]["train"]["max_steps"] == info["step"]
    assert info["config"]["train"]["precision"] == "auto" and list(info["auto"]["timings"]) in (["fp32"], ["bf16"])
    # resumed with auto again: the run keeps its recipe and nothing is timed
    monkeypatch.setattr("trainlab.engine.step.fitted_seconds_per_step", lambda *a, **k: pytest.fail("timed"))
    code = main(["chat", "train", "--resume", "a", "--preset", "auto", "--runs-dir", str(runs_dir), "--no-progress",
                 "--tag", "test"])
    assert code == 0
