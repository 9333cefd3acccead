"""--minutes: a run whose step count is fitted to a wall-clock budget (engine/budget.py)."""

from __future__ import annotations

import json
import math
import time

import pytest
from helpers import cli_train, run_dir, same_training, tb_scalars

from trainlab import runs
from trainlab.config import ConfigError
from trainlab.engine import budget as engine_budget
from trainlab.engine.budget import SHARES, Budget, BudgetTooSmall, fit_steps, plan, seconds_to_end

# The budget's bookkeeping (checks, refits, resumes, extensions, evaluation shares) does not
# depend on the precision a step runs in, so those tests pin fp32 and stay out of the suite's
# bf16 pass, where they repeated a minute of wall-clock budgets (emulated bf16 on an AVX2 CPU
# besides). The fit after auto's choice, in bf16 too, is the first budgeted run's below.
FP32 = ("--precision", "fp32")


@pytest.fixture
def clock_from_now(monkeypatch):
    """The CLI counts a budget from its process's start; a test's process started long ago."""
    monkeypatch.setattr(engine_budget, "process_age", lambda: 0.0)


def test_plan_fills_the_time_left_and_keeps_pauses_to_their_share():
    costs = {"eval": 1.0, "sample": 0.2, "save": 0.1}
    asked = {"eval": 10, "sample": 0, "save": 1000}
    p = plan(5, 100.0, 0.1, costs, asked, 120.0, 2.0)
    evals = (p.steps - 1) // p.every["eval"] - 5 // p.every["eval"]
    assert evals * 1.0 <= SHARES["eval"] * 120  # asked every 10 steps: made rarer to stay in its share
    assert p.every["eval"] > 10 and p.every["sample"] == 0
    assert p.seconds <= 100.0  # never over
    later = plan(5, 100.0, 0.1, costs, asked, 120.0, 2.0)
    assert later == p  # a pure function of what was measured
    assert plan(5, 100.0, 0.1, costs, asked, 120.0, 2.0 + p.seconds - 100.0 + 0.1).steps < p.steps  # no room left
    assert fit_steps(60, 0.25) == 240 and fit_steps(0.1, 1.0) == 1
    with pytest.raises(ValueError):
        fit_steps(60, 0.0)


def test_a_check_within_the_drift_keeps_the_plan_and_a_budget_too_small_is_refused():
    b = Budget(1.0, time.monotonic() + 50, fit_at=5)
    asked = {"eval": 100, "sample": 0, "save": 1000}
    costs, never = {"eval": 0.5}, lambda n: float("inf")
    p = b.fit("fit", 5, 0.1, costs, asked, 1.0, None, 10, never)
    assert p is not None and b.refit_at is not None and b.fit_at is None

    def clock(step, pace, late=0.0):  # the time left as if the run had kept to ``pace`` (and is ``late`` s behind)
        b.deadline = time.monotonic() + seconds_to_end(step, p.steps, pace, costs, p.every, 1.0) - late

    clock(b.refit_at, 0.102)
    assert b.fit("refit", b.refit_at, 0.102, costs, asked, 1.0, p.steps, 10, never) is None
    assert b.fits[-1]["refitted"] is False and b.refit_at is not None  # the next of the checks
    # the pace as planned, but 2 s behind (3% of the minute, from drifts each under 5%): refitted, shorter
    clock(b.refit_at, 0.1, late=2.0)
    again = b.fit("refit", b.refit_at, 0.1, costs, asked, 1.0, p.steps, 10, never)
    assert again is not None and again.steps < p.steps and b.fits[-1]["refitted"] is True
    p = again
    while b.refit_at is not None:
        clock(b.refit_at, 0.1)
        assert b.fit("refit", b.refit_at, 0.1, costs, asked, 1.0, p.steps, 10, never) is None
    assert [f["kind"] for f in b.fits] == ["fit"] + ["refit"] * len(engine_budget.CHECKS)
    assert all(f["at_step"] < p.steps for f in b.fits)
    tight = Budget(0.05, time.monotonic() + 1, fit_at=5)
    with pytest.raises(BudgetTooSmall, match="need at least"):
        tight.fit("fit", 5, 0.5, {"eval": 0.5}, asked, 1.0, None, 100, lambda n: float("inf"))


def test_how_long_is_said_once():
    with pytest.raises(ConfigError, match="both --max-steps and --minutes"):
        runs.settings("chat", "chat-20min", flags={"max_steps": 10, "minutes": 1.0})
    assert runs.settings("chat", "chatgot-14m", flags={"minutes": 2.0})["max_steps"] is None
    with pytest.raises(ConfigError, match="positive number of minutes"):
        runs.checked_task("multiply", {"minutes": -1.0, "min_digits": 1, "max_digits": 1})


def test_a_budgeted_run_ends_in_time_decayed_and_records_its_fits(runs_dir, clock_from_now):
    t = time.monotonic()
    # 12 s: on a 2-core AVX2 EPYC beside another worker, set-up to the first fit took 4.7 s and the
    # end 1.4 s, so 6 s could not hold them and the warm-up (the run was refused)
    # no plateau cuts: with 40 evaluations of a tiny model, five flat ones in a row came now and then
    # (CI, 2026-12-04) and halved the LR under the schedule's end, which is what is checked here
    assert cli_train(runs_dir, "--minutes", "0.2", "--run-name", "b", "--warmup-steps", "3", "--eval-every", "5",
                     "--log-every", "1", "--plateau-patience", "0") == 0
    took = time.monotonic() - t
    info = json.loads((run_dir(runs_dir, "b") / "run.json").read_text())
    b, steps = info["budget"], info["max_steps"]
    # in-process (no interpreter start-up), beside another test worker: loose bounds here; the
    # accuracy itself (within 3%, from outside the process) is benchmarks/minutes_accuracy.py's
    assert 12 * 0.6 <= took <= 12 * 1.5, took
    assert info["status"] == "finished" and info["step"] == steps and b["steps"] == steps > 10
    assert b["fits"][0]["kind"] == "fit" and b["fits"][0]["at_step"] == 5 and b["fits"][1]["kind"] == "refit"
    assert info["config"]["train"]["max_steps"] == steps and info["config"]["train"]["minutes"] == 0.2
    assert info["config"]["train"]["eval_every"] > 5  # evaluations made rarer to fit their share
    lrs = dict(tb_scalars(run_dir(runs_dir, "b") / "simple", "train/lr"))
    assert lrs[steps] == pytest.approx(1e-3 * 0.1)  # decayed to the final LR by the end, not cut
    assert b["last_lr_factor"] == pytest.approx(0.1)
    assert lrs[steps // 2] > 2 * lrs[steps]
    report = (run_dir(runs_dir, "b") / "report.md").read_text()
    assert "Time budget: 0.2 minutes" in report and "fit at step 5" in report


def test_a_plateau_cut_shows_in_the_budgets_last_lr(runs_dir, clock_from_now, monkeypatch):
    # run.json's last_lr_factor said where the schedule ended, and a plateau cut (on by default)
    # that had halved the LR under it went unseen: the benchmarks read it as ended at the final LR
    from trainlab.engine.monitor import Plateau

    def cut_once(self, val_loss, lr_now):
        if self.cuts:
            return False
        self.scale, self.cuts = 0.5, 1
        return True

    monkeypatch.setattr(Plateau, "observe", cut_once)
    # evaluations during the run (the budget makes them rarer than 5), so the cut comes before the end
    assert cli_train(runs_dir, "--minutes", "0.1", "--run-name", "cut", "--warmup-steps", "2", "--eval-every", "5",
                     *FP32) == 0
    info = json.loads((run_dir(runs_dir, "cut") / "run.json").read_text())
    assert info["budget"]["last_lr_factor"] == pytest.approx(0.1 * 0.5)
    lrs = dict(tb_scalars(run_dir(runs_dir, "cut") / "simple", "train/lr"))
    assert lrs[info["step"]] == pytest.approx(1e-3 * 0.1 * 0.5)
    # a cut at the final evaluation, after the last step, leaves that step at the schedule's end
    assert cli_train(runs_dir, "--minutes", "0.1", "--run-name", "late", "--warmup-steps", "2",
                     "--eval-every", "100000", *FP32) == 0
    info = json.loads((run_dir(runs_dir, "late") / "run.json").read_text())
    lrs = dict(tb_scalars(run_dir(runs_dir, "late") / "simple", "train/lr"))
    assert info["budget"]["last_lr_factor"] == pytest.approx(0.1) and lrs[info["step"]] == pytest.approx(1e-4)


def info_steps_kept(info) -> bool:
    """Every check kept the first fit's count."""
    fits = info["budget"]["fits"]
    return all(f["steps"] == fits[0]["steps"] for f in fits)


def test_a_budgeted_run_resumed_after_its_check_ends_as_the_same_steps_would(runs_dir, clock_from_now, monkeypatch):
    # the first fit inside the warm-up (whose LR needs no horizon) and a check that keeps the count:
    # then the budget's run is exactly a run by steps with what the budget chose
    monkeypatch.setattr(engine_budget, "DRIFT", 10.0)
    monkeypatch.setattr(engine_budget, "HOLD", 10.0)
    # the first check early, so that it comes before the cut at step 120 at any pace: at 0.05 it came
    # at step 123 of 2,371 on a fast day (4.6 ms a step, CI 2026-12-04); at 0.01 it holds to 11,000
    monkeypatch.setattr(engine_budget, "CHECKS", (0.01, 0.4, 0.65, 0.85))
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=120")  # a tiny model: 7-45 ms a step, 150-1,000 steps
    # 12 s: as above
    assert cli_train(runs_dir, "--minutes", "0.2", "--run-name", "cut", "--warmup-steps", "10", *FP32) == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    saved = json.loads((run_dir(runs_dir, "cut") / "run.json").read_text())
    steps = saved["max_steps"]
    assert steps > 120 and saved["budget"]["fits"][1]["kind"] == "refit"  # checked before the cut
    assert info_steps_kept(saved)
    assert cli_train(runs_dir, "--resume", "cut", "--minutes", "0.2") == 0  # the same budget: no extension
    info = json.loads((run_dir(runs_dir, "cut") / "run.json").read_text())
    assert info["step"] == steps and info["status"] == "finished" and info_steps_kept(info)
    # the same run by steps, with what the budget chose: bit for bit
    tc = info["config"]["train"]
    assert cli_train(runs_dir, "--max-steps", str(steps), "--lr-decay-steps", str(tc["lr_decay_steps"]),
                     "--eval-every", str(tc["eval_every"]), "--save-every", str(tc["save_every"]),
                     "--run-name", "steps", "--warmup-steps", "10", *FP32) == 0
    same_training(runs_dir, "cut", "steps")


def test_a_budgeted_run_cut_before_its_check_checks_on_resume(runs_dir, clock_from_now, monkeypatch):
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=7")
    assert cli_train(runs_dir, "--minutes", "0.1", "--run-name", "early", "--warmup-steps", "3", *FP32) == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    saved = json.loads((run_dir(runs_dir, "early") / "run.json").read_text())["budget"]
    assert saved["refit_at"] is not None and [f["kind"] for f in saved["fits"]] == ["fit"]
    assert cli_train(runs_dir, "--resume", "early") == 0
    info = json.loads((run_dir(runs_dir, "early") / "run.json").read_text())
    kinds = [(f["kind"], f["at_step"]) for f in info["budget"]["fits"]]
    assert kinds[0] == ("fit", 5) and kinds[1][0] == "refit" and kinds[1][1] >= 12  # measured again after the resume
    assert info["status"] == "finished" and info["step"] == info["max_steps"]


def test_a_finished_budget_extends_by_new_minutes_at_its_final_lr(runs_dir, clock_from_now, capsys):
    # no plateau cuts: one would take the LR under the final one checked below (as above)
    assert cli_train(runs_dir, "--minutes", "0.1", "--run-name", "ext", "--warmup-steps", "2", "--log-every", "1",
                     "--plateau-patience", "0", *FP32) == 0
    first = json.loads((run_dir(runs_dir, "ext") / "run.json").read_text())["max_steps"]
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "ext", "--minutes", "0.1", "--log-every", "1") == 0
    assert "already at step" in capsys.readouterr().out  # the same minutes: nothing more to do
    assert cli_train(runs_dir, "--resume", "ext", "--minutes", "0.06", "--log-every", "1") == 0
    info = json.loads((run_dir(runs_dir, "ext") / "run.json").read_text())
    assert info["step"] > first and any(f.get("kind") == "extension" for f in info["budget"]["fits"])
    lrs = dict(tb_scalars(run_dir(runs_dir, "ext") / "simple", "train/lr"))
    assert all(lrs[s] == pytest.approx(1e-4) for s in range(first, info["step"] + 1))


def test_budget_refusals_are_one_line(runs_dir, clock_from_now, capsys):
    from trainlab.cli import main

    assert cli_train(runs_dir, "--minutes", "1", "--max-steps", "5") == 2
    assert "both --max-steps and --minutes" in capsys.readouterr().err
    assert cli_train(runs_dir, "--minutes", "-1") == 2
    assert "--minutes: must be a positive number" in capsys.readouterr().err
    assert cli_train(runs_dir, "--minutes", "0.001", "--run-name", "small", "--warmup-steps", "50") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "need at least" in err, err
    assert not run_dir(runs_dir, "small").exists()  # a few timed steps: nothing worth keeping
    assert main(["multiply", "compare", "--runs-dir", str(runs_dir), "--preset", "demo", "--minutes", "1"]) == 2
    assert "--budget-minutes" in capsys.readouterr().err


def test_a_report_scored_in_fp32_is_costed_at_what_auto_measured_fp32_to_take():
    from types import SimpleNamespace

    from trainlab.engine.periodic import fp32_slowdown

    def member(mode, measured):
        return SimpleNamespace(precision=SimpleNamespace(mode=mode, measured=measured))

    assert fp32_slowdown([member("bf16", {"fp32": 0.9, "bf16": 0.375})]) == pytest.approx(2.4)
    assert fp32_slowdown([member("fp32", {"fp32": 0.9, "bf16": 0.95})]) == 1.0  # auto kept fp32
    assert fp32_slowdown([member("fp32", {})]) == 1.0  # nothing timed: an explicit precision
    assert fp32_slowdown([member("bf16", {"fp32": 0.2, "bf16": 0.1}), member("bf16", {"fp32": 0.3, "bf16": 0.1})]) \
        == pytest.approx(3.0)  # the slowest member decides
    from trainlab.chat.task import ChatTask
    from trainlab.multiply.task import MultiplyTask

    # chat's span loss runs whole windows in fp32; multiply's greedy decoding gains little from bf16
    assert ChatTask.report_in_fp32 is True and not getattr(MultiplyTask, "report_in_fp32", False)


@pytest.mark.parametrize("command", ["chat", "multiply"])
def test_part_of_an_evaluation_runs_the_share_it_reports(command, tmp_path, monkeypatch):
    """A budget times a part of an evaluation and scales it up (engine/periodic._probe): the share
    a task reports must be the share of an evaluation's work that ran, in the same batch sizes."""
    import torch
    from helpers import made_up_text

    import trainlab.multiply.task as multiply_task

    torch.manual_seed(0)
    if command == "chat":
        text = tmp_path / "play.txt"
        text.write_text(made_up_text(2000))
        values = runs.settings("chat", "chatgot-tiny", None, {"text": str(text), "eval_batches": 10, "context_len": 16})
    else:
        values = runs.settings("multiply", "multiply-3digit", None, {"eval_samples": 1000, "d_model": 32, "nhead": 4})
    _, task = runs.checked_task(command, {**values, "max_steps": 1, "minutes": None})
    model = task.build_models()[task.member_names[0]].eval()
    work: list[tuple[str, int]] = []  # (what, rows) of every batch of work the evaluation did
    if command == "chat":
        inner = task.windows_loss
        def counted(m, split, starts, bs):
            work.extend(("window", len(starts[i:i + bs])) for i in range(0, len(starts), bs))
            return inner(m, split, starts, bs)

        monkeypatch.setattr(task, "windows_loss", counted)
    else:
        decode, forced = multiply_task.decode_problems, task.teacher_forced_loss
        monkeypatch.setattr(multiply_task, "decode_problems", lambda m, d, idx, bs=1024: (
            work.append(("decode", len(idx))), decode(m, d, idx, bs))[1])
        monkeypatch.setattr(task, "teacher_forced_loss", lambda m, idx, bs: (
            work.append(("forced", len(idx))), forced(m, idx, bs))[1])
    task.evaluate(task.member_names[0], model, 0)
    whole, work[:] = list(work), []
    share = task.evaluate_part(task.member_names[0], model, 0, None, 0.2)
    part = list(work)
    for what in {what for what, _ in whole}:  # each kind of work in the share reported
        ran = sum(n for w, n in part if w == what) / sum(n for w, n in whole if w == what)
        assert ran == pytest.approx(share, abs=0.005), what
    assert 0.1 <= share <= 0.3  # about the part asked for
    if command == "chat":  # whole batches of the evaluation's size, as a timing of it needs
        assert {n for _, n in part} == {task.train_cfg.batch_size}
    assert {what for what, _ in part} == {what for what, _ in whole}  # every kind of work is timed
    # the report's own scoring, timed on a part of it the same way
    work.clear()
    if command == "chat":
        task.span_loss(model)  # what the report scores
    else:
        import trainlab.multiply.evaluation as evaluation

        monkeypatch.setattr(evaluation, "decode_problems", multiply_task.decode_problems)  # counted too
        evaluation.evaluate_members({task.member_names[0]: model}, task.dataset, "test", task.task_cfg.test_n, seed=0)
    whole, work[:] = list(work), []
    share = task.report_part({task.member_names[0]: model}, 0.2)
    assert sum(n for _, n in work) / sum(n for _, n in whole) == pytest.approx(share) and 0.1 <= share <= 0.3


def test_a_budget_times_part_of_an_evaluation_and_scales_it_up(runs_dir, clock_from_now, monkeypatch):
    import trainlab.multiply.task as multiply_task

    parts: list[float] = []

    def slow_part(self, member, model, step, batch_limit, part):
        parts.append(part)
        time.sleep(0.05)
        return 0.1  # a tenth of an evaluation took 0.05 s: a whole one costs 0.5 s

    def slow_report(self, models, part):
        parts.append(("report", part, sorted(models)))
        time.sleep(0.1)
        return 0.1  # the whole report's scoring: 1 s

    monkeypatch.setattr(multiply_task.MultiplyTask, "evaluate_part", slow_part, raising=False)
    monkeypatch.setattr(multiply_task.MultiplyTask, "report_part", slow_report, raising=False)
    assert cli_train(runs_dir, "--minutes", "0.2", "--run-name", "p", "--warmup-steps", "3", *FP32) == 0
    fit = json.loads((run_dir(runs_dir, "p") / "run.json").read_text())["budget"]["fits"][0]
    p = engine_budget.PROBE_PART  # each member's evaluation probed once, at the first fit, and the report once
    assert parts == [p, p, ("report", p, ["latent", "simple"])]
    assert 1.0 <= fit["costs"]["eval"] < 1.5, fit  # both members' whole evaluations
    # the end: the last evaluation, the report's scoring as timed (not evaluations times a ratio), the rest
    assert 1.0 + 1.0 + engine_budget.END_SECONDS <= fit["end"] < 1.5 + 1.5 + engine_budget.END_SECONDS + 0.5, fit


def test_a_refit_places_the_checks_still_ahead_on_its_own_plan():
    """A first pace 30% slow planned too few steps; the refit's plan is longer, and its checks
    reach the shares of it (the last at 85%), not where the first plan put them."""
    b = Budget(20.0, time.monotonic() + 1180, fit_at=5)
    asked = {"eval": 500, "sample": 0, "save": 1000}
    costs, never = {"eval": 5.0}, lambda n: float("inf")
    first = b.fit("fit", 5, 1.0, costs, asked, 10.0, None, 100, never)
    planned = [b.refit_at] + b.checks
    assert planned == [5 + round(c * (first.steps - 5)) for c in engine_budget.CHECKS]
    check = b.refit_at
    b.deadline = time.monotonic() + 1180 - check * 1.0  # as if the steps so far took the slow pace
    longer = b.fit("refit", check, 0.72, costs, asked, 10.0, first.steps, 100, never)
    assert longer is not None and longer.steps > 1.3 * first.steps
    ahead = [b.refit_at] + b.checks
    assert ahead == [5 + round(c * (longer.steps - 5)) for c in engine_budget.CHECKS[1:]]
    assert ahead[-1] > max(planned) and ahead[-1] / longer.steps > 0.8
    assert ahead[0] - check >= engine_budget.CHECK_GAP * (longer.steps - 5)  # not a second check at once


def test_a_wsd_plan_is_checked_once_more_at_its_last_step_before_the_decay():
    """The shares past a WSD decay's start are not checked (a refit there would move the decay
    under the run), so the last step before it is: chat-quick's decay is its last 40%."""
    asked = {"eval": 1000, "sample": 0, "save": 1000}
    costs = {"eval": 0.5}

    def decay_from(n: int) -> float:  # no warm-up, the last 40% of the steps decayed
        return 0.6 * n

    b = Budget(1.0, time.monotonic() + 55, fit_at=5)
    p = b.fit("fit", 5, 0.1, costs, asked, 1.0, None, 0, decay_from)
    planned = [b.refit_at] + b.checks
    shares = [5 + round(c * (p.steps - 5)) for c in engine_budget.CHECKS]
    last = math.ceil(0.6 * p.steps) - 1
    assert planned == [c for c in shares if c < 0.6 * p.steps] + [last]
    assert len(planned) < len(shares) + 1  # the shares inside the decay are gone
    # cosine (no decay start): the shares alone
    c = Budget(1.0, time.monotonic() + 55, fit_at=5)
    q = c.fit("fit", 5, 0.1, costs, asked, 1.0, None, 0, lambda n: float("inf"))
    assert [c.refit_at] + c.checks == [5 + round(s * (q.steps - 5)) for s in engine_budget.CHECKS]
