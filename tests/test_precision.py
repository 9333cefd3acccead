"""Mixed precision: the choice per device, real autocast, non-finite steps skipped, the fp32 fall-back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_train_config
from helpers import assert_same_tensors, cli_train, run_dir, tb_scalars, tiny_multiply

from trainlab.config import ConfigError
from trainlab.engine import faults, precision
from trainlab.engine import step as engine_step
from trainlab.engine.checkpoint import latest_checkpoint
from trainlab.engine.loop import train
from trainlab.engine.precision import Precision, pick_precision, precision_candidates, resolve_precision
from trainlab.engine.tracking import new_run

CPU = torch.device("cpu")


def test_auto_candidates_by_device_and_the_test_hook(monkeypatch):
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision_candidates("auto", CPU) == ("fp32",) and resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision_candidates("auto", CPU) == ("fp32", "bf16")  # timed on the first batch
    assert resolve_precision("auto", CPU) == "fp32"  # what runs until the timing decides
    for name in ("fp32", "bf16", "fp16"):
        assert precision_candidates(name, CPU) == (name,)  # an explicit choice is never timed or overridden
        monkeypatch.setenv(precision.AUTO_ENV, name)
        assert precision_candidates("auto", CPU) == (name,)
        assert precision_candidates("fp32", CPU) == ("fp32",)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv(precision.AUTO_ENV, "measure")
    assert precision_candidates("auto", CPU) == ("fp32", "bf16")
    monkeypatch.setenv(precision.AUTO_ENV, "fp64")
    with pytest.raises(ConfigError, match=precision.AUTO_ENV):
        precision_candidates("auto", CPU)
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp8", CPU)


def test_bf16_is_kept_only_when_faster_by_the_margin():
    assert precision.BF16_MARGIN == 0.05
    assert pick_precision({"fp32": 1.0, "bf16": 0.9}) == "bf16"
    assert pick_precision({"fp32": 1.0, "bf16": 0.96}) == "fp32"  # 4% is within noise
    assert pick_precision({"fp32": 1.0, "bf16": 1.3}) == "fp32"
    assert pick_precision({"fp32": float("inf"), "bf16": 2.0}) == "bf16"  # fp32 did not fit
    assert pick_precision({"fp32": 1.0}) == "fp32"


def test_slow_bf16_on_a_cpu_without_it_is_one_warning_line(monkeypatch, runs_dir, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    line = precision.slow_precision_warning("bf16", CPU)
    assert line.startswith("warning: --precision bf16: this CPU has no native bf16") and "fp32" in line
    assert precision.slow_precision_warning("fp32", CPU) is None
    assert precision.slow_precision_warning("auto", CPU) is None
    assert cli_train(runs_dir, "--max-steps", "1", "--precision", "bf16", "--run-name", "slow") == 0  # still trains
    assert capsys.readouterr().err.splitlines() == [line]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.slow_precision_warning("bf16", CPU) is None


def test_autocast_is_real_and_weights_stay_fp32():
    lin = torch.nn.Linear(4, 4)
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        p = Precision(mode, CPU)
        with p.autocast():
            assert lin(torch.randn(2, 4)).dtype == dtype
        assert lin.weight.dtype == torch.float32
        assert p.scaler.is_enabled() == (mode == "fp16")


def spy_autocast(task) -> list[tuple[int, bool]]:
    """Wrap the task's loss to record, per call, whether autocast was on around it."""
    seen, original = [], task.loss

    def loss(member, model, batch, step):
        seen.append((step, torch.is_autocast_enabled("cpu")))
        return original(member, model, batch, step)

    task.loss = loss
    return seen


def simple_only(cfg):
    """The tiny multiplication task with its simple member alone."""
    task, config = tiny_multiply(cfg)
    task.model_cfgs = {"simple": task.model_cfgs["simple"]}
    task.member_names = ["simple"]
    return task, config


def run_tiny(runs_dir, name, faults_spec="", monkeypatch=None, **kw):
    cfg = tiny_train_config(runs_dir, **kw)
    task, config = simple_only(cfg)
    seen = spy_autocast(task)
    if monkeypatch is not None:
        monkeypatch.setenv(faults.ENV, faults_spec)
    run = new_run(cfg.runs_dir, task.name, name, "test", config)
    lines: list[str] = []
    summary = train(task, cfg, run, config, echo=lines.append)
    return summary, run, seen, lines


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("fault", ["nonfinite", "nonfinite_grad"])
def test_a_non_finite_step_changes_nothing_but_is_counted(runs_dir, monkeypatch, fault, mode):
    """Step 3's loss (or gradient) is poisoned: after it, weights and optimizer state are
    exactly those of a run that stopped after step 2, and the skip is on record; in bf16 as
    in fp32 (both runs in the same precision, so equal to the bit). The schedule follows the
    batches, so it has moved on by one."""
    common = dict(lr_decay_steps=10, log_every=1, precision=mode)
    skipped, run, _, _ = run_tiny(runs_dir, "skipped", f"{fault}=3", monkeypatch, max_steps=3, **common)
    monkeypatch.delenv(faults.ENV)
    two, run2, _, _ = run_tiny(runs_dir, "two", max_steps=2, **common)
    (m,), (m2,) = skipped.members, two.members
    assert skipped.step == 3 and m.step == 2 and m.health.skipped_nonfinite == 1
    assert_same_tensors(m.model.state_dict(), m2.model.state_dict(), "weights")
    assert_same_tensors(m.optimizer.state_dict()["state"], m2.optimizer.state_dict()["state"], "optimizer")
    assert m.scheduler.last_epoch == 3 and m2.scheduler.last_epoch == 2
    assert tb_scalars(run.dir / "simple", "health/skipped_nonfinite") == [(1, 0.0), (2, 0.0), (3, 1.0)]
    losses = [v for _, v in tb_scalars(run.dir / "simple", "train/loss")]
    assert len(losses) == 2 + (fault == "nonfinite_grad") and all(torch.isfinite(torch.tensor(losses)))
    saved = latest_checkpoint(run.checkpoints).tensors("simple/train_state.pt")
    assert saved["health"]["skipped_nonfinite"] == 1 and saved["step"] == 2


def test_repeated_non_finite_steps_fall_back_to_fp32_for_good(runs_dir, monkeypatch, capsys):
    summary, run, seen, lines = run_tiny(runs_dir, "fb", "nonfinite=2,nonfinite=3", monkeypatch, max_steps=5,
                                         precision="bf16", max_nonfinite=2, log_every=1)  # read every step
    assert [on for _, on in seen] == [True, True, True, False, False]  # steps 1-3 in bf16, then fp32
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["[step 2] simple: spike, loss is nan; update skipped",
                       "[step 3] simple: spike, loss is nan; update skipped",
                       "[step 3] simple: 2 non-finite steps in a row under bf16; falling back to fp32 for the rest "
                       "of the run"]
    ck = latest_checkpoint(run.checkpoints)
    state = ck.tensors("simple/train_state.pt")["precision"]
    assert state["mode"] == "fp32" and state["fell_back_at"] == 3
    assert tb_scalars(run.dir / "simple", "health/fp32_fallback")[-1] == (5, 1.0)
    # a resume keeps the fall-back, whatever --precision says
    monkeypatch.delenv(faults.ENV)
    cfg = tiny_train_config(runs_dir, max_steps=7, precision="bf16", max_nonfinite=2)
    task, config = simple_only(cfg)
    seen2 = spy_autocast(task)
    lines2: list[str] = []
    train(task, cfg, run, config, resume=ck, echo=lines2.append)
    assert [on for _, on in seen2] == [False, False]
    assert lines2[0].endswith("parameters, precision fp32 (fell back from bf16 at step 3)")


def test_non_finite_steps_in_fp32_stop_the_run_with_one_line(runs_dir, monkeypatch, capsys):
    monkeypatch.setenv(faults.ENV, "nonfinite=2,nonfinite=3,nonfinite=4")
    assert cli_train(runs_dir, "--max-steps", "6", "--run-name", "div", "--precision", "fp32",
                     "--max-nonfinite", "3") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "step 4" in err
    assert json.loads((run_dir(runs_dir, "div") / "run.json").read_text())["status"] == "failed"


def test_fp16_scales_the_loss_and_backs_off_after_an_overflow(runs_dir, monkeypatch):
    summary, run, _, _ = run_tiny(runs_dir, "h", "nonfinite_grad=2", monkeypatch, max_steps=3, precision="fp16")
    (m,) = summary.members
    assert m.precision.mode == "fp16" and m.health.skipped_nonfinite == 1 and m.step == 2
    scaler = latest_checkpoint(run.checkpoints).tensors("simple/train_state.pt")["precision"]["scaler"]
    assert scaler["scale"] == 2.0**15  # halved from the initial 2**16 by the overflow
    assert all(torch.isfinite(p).all() for p in m.model.parameters())


@pytest.mark.parametrize("flags, message", [
    (["--precision", "fp8"], "--precision"),
    (["--on-spike", "panic"], "--on-spike"),
    (["--loss-window", "1"], "--loss-window"),
    (["--plateau-factor", "1"], "--plateau-factor"),
    (["--max-nonfinite", "0"], "--max-nonfinite"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--micro-batch", "half"], "--micro-batch"),
])
def test_bad_robustness_flags_are_one_line(runs_dir, capsys, flags, message):
    assert cli_train(runs_dir, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# -- --precision auto by measurement ------------------------------------------------------
def stub_clock(monkeypatch, task, fp32: float, bf16: float) -> list[str]:
    """Every timed pass 'takes' ``fp32`` or ``bf16`` seconds, by whether the task's loss ran
    under autocast; returns the modes of the timed passes in order."""
    seen = spy_autocast(task)
    modes: list[str] = []

    def time_pass(run, device):
        run()
        modes.append("bf16" if seen[-1][1] else "fp32")
        return bf16 if seen[-1][1] else fp32

    monkeypatch.setattr(engine_step, "time_pass", time_pass)
    return modes


def measured_run(runs_dir, monkeypatch, name, fp32, bf16, resume=None, **kw):
    monkeypatch.setenv(precision.AUTO_ENV, "measure")
    cfg = tiny_train_config(runs_dir, precision="auto", **kw)
    task, config = simple_only(cfg)
    modes = stub_clock(monkeypatch, task, fp32, bf16)
    run = resume[0] if resume else new_run(cfg.runs_dir, task.name, name, "test", config)
    lines: list[str] = []
    summary = train(task, cfg, run, config, resume=resume and resume[1], echo=lines.append)
    return summary, run, modes, lines


def test_auto_times_fp32_and_bf16_once_and_a_resume_keeps_the_choice(runs_dir, monkeypatch):
    summary, run, modes, lines = measured_run(runs_dir, monkeypatch, "m", fp32=2.0, bf16=1.0, max_steps=3)
    # a warm-up of each, then rounds that alternate the candidates: 2x apart, one round decides
    assert modes == ["fp32", "bf16"] * 2
    assert lines[0].endswith("parameters, precision auto, timing fp32 and bf16")
    assert lines[1] == "simple: --precision auto: bf16 (fp32 2 s, bf16 1 s per pass of the first batch; bf16 must " \
                       "be 5% faster)"
    (m,) = summary.members
    assert m.precision.mode == "bf16" and m.precision.measured == {"fp32": 2.0, "bf16": 1.0}
    ck = latest_checkpoint(run.checkpoints)
    saved = ck.tensors("simple/train_state.pt")["precision"]
    assert saved["mode"] == "bf16" and saved["requested"] == "auto" and saved["measured"] == {"fp32": 2.0, "bf16": 1.0}
    # resumed: no timing, bf16 from the first step, even if the clock would now say otherwise
    summary, _, modes, lines = measured_run(runs_dir, monkeypatch, "m", fp32=1.0, bf16=2.0, max_steps=5,
                                            resume=(run, ck))
    assert modes == [] and not any("--precision auto:" in line for line in lines)
    assert lines[0].endswith("parameters, precision bf16") and summary.members[0].precision.mode == "bf16"
    # an explicit --precision on resume wins over the saved choice
    cfg = tiny_train_config(runs_dir, precision="fp32", max_steps=6)
    task, config = simple_only(cfg)
    seen = spy_autocast(task)
    train(task, cfg, run, config, resume=latest_checkpoint(run.checkpoints), echo=lambda *a: None)
    assert [on for _, on in seen] == [False]


def test_auto_decides_by_timings_made_just_before_the_run_without_timing_again(runs_dir, monkeypatch):
    """``--preset auto`` timed the recipe's steps in both precisions: the run's ``auto`` decides
    by them (and keeps them, for the budget's fp32 report cost), timing nothing; timings of
    other candidates than this machine's are ignored."""
    monkeypatch.setenv(precision.AUTO_ENV, "measure")
    cfg = tiny_train_config(runs_dir, precision="auto", max_steps=2)
    task, config = simple_only(cfg)
    modes = stub_clock(monkeypatch, task, 1.0, 2.0)  # the clock would pick fp32
    lines: list[str] = []
    summary = train(task, cfg, new_run(cfg.runs_dir, task.name, "given", "test", config), config,
                    echo=lines.append, timed_precisions={"fp32": 0.3, "bf16": 0.1})
    assert modes == [] and lines[0] == "simple: --precision auto: bf16 (as timed a step before the run: " \
                                       "fp32 0.3 s, bf16 0.1 s)"
    (m,) = summary.members
    assert m.precision.mode == "bf16" and m.precision.measured == {"fp32": 0.3, "bf16": 0.1}
    summary = train(task, cfg, new_run(cfg.runs_dir, task.name, "other", "test", config), config,
                    echo=lines.append, timed_precisions={"fp32": 0.3})
    assert modes == ["fp32", "bf16"] * 2 and summary.members[0].precision.mode == "fp32"
    # bf16 timed alone (auto had seen it beat fp32 on a smaller recipe) settles it as well
    modes.clear()
    summary = train(task, cfg, new_run(cfg.runs_dir, task.name, "bf16-alone", "test", config), config,
                    echo=lines.append, timed_precisions={"bf16": 0.1})
    assert modes == [] and summary.members[0].precision.mode == "bf16"
    assert "simple: --precision auto: bf16 (as timed a step before the run: bf16 0.1 s)" in lines


def test_auto_keeps_fp32_when_bf16_is_not_faster_by_the_margin(runs_dir, monkeypatch):
    summary, run, modes, lines = measured_run(runs_dir, monkeypatch, "close", fp32=1.0, bf16=0.97, max_steps=2)
    assert "simple: --precision auto: fp32 (fp32 1 s, bf16 0.97 s" in lines[1]
    assert summary.members[0].precision.mode == "fp32"
    assert latest_checkpoint(run.checkpoints).tensors("simple/train_state.pt")["precision"]["mode"] == "fp32"


def test_auto_and_micro_batch_auto_are_chosen_together(runs_dir, monkeypatch):
    """The best micro-batch can differ by precision: every pair is timed, the precision is
    picked on each one's best time, then the count within it."""
    monkeypatch.setenv(precision.AUTO_ENV, "measure")
    cfg = tiny_train_config(runs_dir, precision="auto", micro_batch="auto", batch_size=16, max_steps=2)
    task, config = simple_only(cfg)
    seen = spy_autocast(task)
    timed: list[tuple[str, int]] = []
    # fp32 is best whole (1.0), bf16 best in 2 micro-batches (0.8): bf16 wins, in 2
    table = {("fp32", 1): 1.0, ("fp32", 2): 1.2, ("fp32", 4): 1.5, ("bf16", 1): 1.1, ("bf16", 2): 0.8, ("bf16", 4): 0.9}

    def time_pass(run, device):
        before = len(seen)
        run()
        key = ("bf16" if seen[-1][1] else "fp32", len(seen) - before)
        timed.append(key)
        return table[key]

    monkeypatch.setattr(engine_step, "time_pass", time_pass)
    run = new_run(cfg.runs_dir, task.name, "pair", "test", config)
    lines: list[str] = []
    summary = train(task, cfg, run, config, echo=lines.append)
    assert sorted(set(timed)) == sorted(table)
    (m,) = summary.members
    assert m.precision.mode == "bf16" and m.micro.count == 2
    assert any(line.startswith("simple: --micro-batch auto: 8 examples at a time is the fastest in bf16") for line in lines)


def test_every_rank_follows_rank_zeros_timings(runs_dir, monkeypatch):
    """Under torchrun the timings are broadcast from rank 0 and every rank decides on them,
    whatever its own clock said: here the local clock favours fp32, rank 0's bf16."""
    def rank_zero_says(obj, d):
        if isinstance(obj, dict) and obj and isinstance(next(iter(obj)), tuple):
            return {(mode, count): (0.5 if mode == "bf16" else 1.0) for mode, count in obj}
        return obj

    monkeypatch.setattr(engine_step, "broadcast", rank_zero_says)
    summary, _, modes, lines = measured_run(runs_dir, monkeypatch, "ranks", fp32=1.0, bf16=2.0, max_steps=1)
    assert summary.members[0].precision.mode == "bf16" and "--precision auto: bf16" in lines[1]


def test_auto_timing_for_real(runs_dir, monkeypatch):
    """No stub: the line names both timings and the mode the margin rule gives for them."""
    monkeypatch.setenv(precision.AUTO_ENV, "measure")
    cfg = tiny_train_config(runs_dir, precision="auto", max_steps=2)
    task, config = simple_only(cfg)
    lines: list[str] = []
    summary = train(task, cfg, new_run(cfg.runs_dir, task.name, "real", "test", config), config, echo=lines.append)
    m = summary.members[0]
    assert set(m.precision.measured) == {"fp32", "bf16"} and all(t > 0 for t in m.precision.measured.values())
    assert m.precision.mode == pick_precision(m.precision.measured)
    assert lines[1].startswith(f"simple: --precision auto: {m.precision.mode} (fp32 ")


# -- the bf16 path on its own tolerances ------------------------------------------------------
def test_bf16_losses_track_fp32_within_two_percent(runs_dir, tmp_path):
    """The same chat run in fp32 and in bf16: bf16 keeps 8 bits of mantissa (~0.4% per
    value), so over 12 steps the training losses may drift apart, by at most 2% here,
    and both learn."""
    from helpers import chat_train, made_up_text

    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    flags = ["--max-steps", "12", "--dropout", "0", "--eval-every", "12", "--log-every", "1"]
    for mode in ("fp32", "bf16"):
        assert chat_train(runs_dir, corpus, "--run-name", mode, "--precision", mode, *flags) == 0
    fp32, bf16 = ([v for _, v in tb_scalars(runs_dir / "chat" / mode / "gpt", "train/loss")] for mode in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 12
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.02 * a, (fp32, bf16)
    assert fp32[-1] < 0.9 * fp32[0] and bf16[-1] < 0.9 * bf16[0]
    val = [latest_checkpoint(runs_dir / "chat" / mode / "checkpoints").tensors("gpt/train_state.pt")["evals"][-1]
           ["val_loss"] for mode in ("fp32", "bf16")]
    assert abs(val[0] - val[1]) <= 0.02 * val[0]


def test_bf16_micro_batches_give_the_whole_batch_update_to_bf16_tolerance(runs_dir, monkeypatch):
    """An out-of-memory split in bf16: every sample once, losses within bf16's rounding of
    the unsplit run's (the gradients still accumulate in fp32), and weights within two Adam
    steps (2 x lr: Adam turns a rounding-size gradient into a whole step); the key biases,
    whose true gradient is zero, move by noise alone, within lr per step."""
    def run(name, spec=""):
        monkeypatch.setenv(faults.ENV, spec)
        cfg = tiny_train_config(runs_dir, max_steps=6, precision="bf16", recover_after=2)
        task, config = tiny_multiply(cfg)
        return train(task, cfg, new_run(cfg.runs_dir, task.name, name, "test", config), config, echo=lambda *a: None)

    whole, split = run("whole"), run("split", "oom_above=3")
    for a, b in zip(whole.members, split.members):
        assert b.micro.ooms >= 1 and a.examples == b.examples == 48
        for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            atol = 6e-3 if k.endswith("kv.bias") else 2e-3
            torch.testing.assert_close(va, vb, rtol=0, atol=atol, msg=f"{a.name} {k}")
        assert len(a.losses) == len(b.losses) > 0  # zip would stop at the shorter one silently
        for (s1, l1), (s2, l2) in zip(a.losses, b.losses):
            assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-3)


@pytest.mark.parametrize("bf16_seconds, picked", [(0.5, "bf16"), (0.97, "fp32")])
def test_a_budget_is_fitted_in_the_precision_auto_will_pick(runs_dir, monkeypatch, bf16_seconds, picked):
    """`tune --budget-minutes` and the benchmarks' --minutes fit steps to a time: under auto
    both candidates are timed and the step time is the one of the precision the run will
    keep, by the same rule as the loop's (bf16 only when faster by the margin)."""
    monkeypatch.setenv(precision.AUTO_ENV, "measure")
    timed = []

    def fake(task, cfg, device=None, n=12, warmup=3):
        timed.append(cfg.precision)
        return {"fp32": 1.0, "bf16": bf16_seconds}[cfg.precision]

    monkeypatch.setattr(engine_step, "seconds_per_step", fake)
    cfg = tiny_train_config(runs_dir, precision="auto")
    task, _ = tiny_multiply(cfg)
    seconds, label, timings = engine_step.fitted_seconds_per_step(task, cfg)
    assert timed == ["fp32", "bf16"] and timings == {"fp32": 1.0, "bf16": bf16_seconds}
    assert seconds == {"fp32": 1.0, "bf16": bf16_seconds}[picked] and label.startswith(f"auto -> {picked}")
    timed.clear()  # a mode already known to win (auto's larger recipes) is timed alone
    seconds, label, timings = engine_step.fitted_seconds_per_step(task, cfg, known="bf16")
    assert timed == ["bf16"] and timings == {"bf16": bf16_seconds} and seconds == bf16_seconds
    monkeypatch.setenv(precision.AUTO_ENV, "fp32")
    timed.clear()
    assert engine_step.fitted_seconds_per_step(task, cfg) == (1.0, "fp32", {"fp32": 1.0}) and timed == ["fp32"]
    timed.clear()  # known, but not a candidate here: what the machine offers is timed
    assert engine_step.fitted_seconds_per_step(task, cfg, known="bf16") == (1.0, "fp32", {"fp32": 1.0})


def test_timing_precisions_stops_once_more_rounds_could_not_change_the_choice(runs_dir, monkeypatch):
    from trainlab.engine.step import DECISIVE_SLACK, decisive

    assert decisive({"fp32": 2.0, "bf16": 1.0}) and decisive({"fp32": 1.0, "bf16": 2.0})
    assert not decisive({"fp32": 1.0, "bf16": 0.9})  # within reach of noise: timed again
    assert not decisive({"fp32": 1.0, "bf16": float("inf")})  # a mode that did not fit decides nothing alone
    assert not decisive({"fp32": 1.0})
    assert decisive({"fp32": 1.0, "bf16": 0.9}, slack=0.0) and DECISIVE_SLACK > 0.05
    # close timings (passes under 1 s: three rounds) are timed in every round
    _, _, modes, lines = measured_run(runs_dir, monkeypatch, "close", fp32=0.5, bf16=0.45, max_steps=2)
    assert modes == ["fp32", "bf16"] * 4 and "--precision auto: bf16" in lines[1]


def test_what_auto_timed_is_kept_per_machine_and_a_later_run_decides_by_it(runs_dir, monkeypatch):
    """A second fresh run of the same model and batch on the same machine takes the kept
    timings instead of timing again; a damaged file is timed anew and rewritten, and another
    model shape is not taken for the same."""
    from trainlab.engine import timings

    summary, _, modes, lines = measured_run(runs_dir, monkeypatch, "first", fp32=2.0, bf16=1.0, max_steps=2)
    assert modes == ["fp32", "bf16"] * 2 and summary.members[0].precision.mode == "bf16"
    (kept,) = (runs_dir / timings.FOLDER).glob("*.json")
    # the clock would now pick fp32, but the machine's timings are kept: nothing is timed
    summary, _, modes, lines = measured_run(runs_dir, monkeypatch, "second", fp32=1.0, bf16=2.0, max_steps=2)
    assert modes == [] and summary.members[0].precision.mode == "bf16"
    assert lines[1] == "simple: --precision auto: bf16 (fp32 2 s, bf16 1 s timed on this machine before; bf16 " \
                       "must be 5% faster)"
    assert summary.members[0].precision.measured == {"fp32": 2.0, "bf16": 1.0}
    kept.write_text('{"key": "not json of the same')
    summary, _, modes, lines = measured_run(runs_dir, monkeypatch, "third", fp32=1.0, bf16=2.0, max_steps=2)
    assert modes == ["fp32", "bf16"] * 2 and summary.members[0].precision.mode == "fp32"
    assert [[m, c, t] for m, c, t in json.loads(kept.read_text())["timings"]] == [["fp32", 1, 1.0], ["bf16", 1, 2.0]]
    cfg = tiny_train_config(runs_dir, precision="auto", max_steps=2)
    task, config = simple_only(cfg)
    task.model_cfgs["simple"] = replace(task.model_cfgs["simple"], dim_feedforward=48)
    modes = stub_clock(monkeypatch, task, 2.0, 1.0)
    train(task, cfg, new_run(cfg.runs_dir, task.name, "wider", "test", config), config, echo=lambda *a: None)
    assert modes == ["fp32", "bf16"] * 2 and len(list((runs_dir / timings.FOLDER).glob("*.json"))) == 2


def test_kept_timings_are_read_back_only_for_their_own_key(tmp_path):
    from trainlab.engine.timings import load_timings, save_timings

    key = {"model": "m", "modes": ["fp32", "bf16"], "counts": [1, 2]}
    t = {("fp32", 1): 2.0, ("fp32", 2): 1.5, ("bf16", 1): 1.0, ("bf16", 2): float("inf")}
    assert save_timings(tmp_path, key, t) is not None
    assert load_timings(tmp_path, key) == t
    assert load_timings(tmp_path, {**key, "model": "other"}) is None
    assert save_timings(tmp_path, key, {("fp32", 1): 2.0}) is not None  # a pair missing: not used
    assert load_timings(tmp_path, key) is None
