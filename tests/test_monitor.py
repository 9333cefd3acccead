"""Loss trend, spikes and what the loop does about them, plateau LR cuts, and the ETA."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_train_config
from helpers import assert_same_tensors, cli_train, final_state, run_dir, tb_scalars, tiny_multiply

from trainlab.engine import faults
from trainlab.engine.loop import train
from trainlab.engine.monitor import Eta, LossTrend, Plateau, due
from trainlab.engine.tracking import new_run


# -- loss trend and spikes ---------------------------------------------------------------------
def test_spikes_are_flagged_against_the_window_and_do_not_lock_it():
    rng = random.Random(0)
    trend = LossTrend(window=30, sigma=6.0)
    flagged = [trend.observe(2.0 + rng.gauss(0, 0.05)) for _ in range(30)]
    assert not any(flagged)
    assert trend.observe(2.15) is None  # 3 sd: noise
    why = trend.observe(3.0)
    assert why is not None and "sd above the 30-step mean" in why
    assert max(trend.values) < 2.5  # the spike entered the window clipped to the bound
    assert trend.observe(float("nan")) == "loss is nan" and trend.spikes == 2
    # a lasting rise is flagged at first, then becomes the new normal
    later = [trend.observe(3.2 + rng.gauss(0, 0.05)) for _ in range(80)]
    assert any(later[:5]) and not any(later[-40:])
    state = trend.state_dict()
    again = LossTrend(30, 6.0)
    again.load_state_dict(state)
    assert again.state_dict() == state and again.mean == pytest.approx(trend.mean)


def test_the_ema_and_moving_average():
    trend = LossTrend(window=3, sigma=100.0)
    for x in (4.0, 2.0, 3.0, 1.0):
        trend.observe(x)
    assert trend.mean == pytest.approx(2.0)  # the last 3
    ema = 4.0
    for x in (2.0, 3.0, 1.0):
        ema += 0.5 * (x - ema)  # span 3: alpha 2 / (3 + 1)
    assert trend.ema == pytest.approx(ema)


def simple_only(cfg):
    task, config = tiny_multiply(cfg)
    task.model_cfgs = {"simple": task.model_cfgs["simple"]}
    task.member_names = ["simple"]
    return task, config


def run_simple(runs_dir, name, monkeypatch, spec="", **kw):
    monkeypatch.setenv(faults.ENV, spec)
    cfg = tiny_train_config(runs_dir, **{"lr_decay_steps": 20, "loss_window": 4, "log_every": 4, **kw})
    task, config = simple_only(cfg)
    run = new_run(cfg.runs_dir, task.name, name, "test", config)
    (m,) = train(task, cfg, run, config, echo=lambda *a: None).members
    return m, run


def same_member_state(a, b, batches_ahead=0):
    """Weights, optimizer state and update count alike; the schedule follows the batches, so
    ``a``'s is ahead by the batches it skipped or rolled back."""
    assert_same_tensors(a.model.state_dict(), b.model.state_dict(), "weights")
    assert_same_tensors(a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"], "optimizer")
    assert a.step == b.step and a.scheduler.last_epoch == b.scheduler.last_epoch + batches_ahead


def test_on_spike_log_counts_and_still_updates(runs_dir, monkeypatch, capsys):
    m, run = run_simple(runs_dir, "log", monkeypatch, "spike=7", max_steps=8)
    assert m.trend.spikes == 1 and m.health.skipped_spikes == 0 and m.step == 8
    assert "[step 7] simple: spike, loss" in capsys.readouterr().out
    assert tb_scalars(run.dir / "simple", "health/loss_spikes") == [(4, 0.0), (8, 1.0)]


def test_on_spike_skip_leaves_the_state_as_it_was(runs_dir, monkeypatch):
    skipped, _ = run_simple(runs_dir, "skip", monkeypatch, "spike=7", max_steps=7, on_spike="skip")
    six, _ = run_simple(runs_dir, "six", monkeypatch, max_steps=6)
    assert skipped.health.skipped_spikes == 1
    same_member_state(skipped, six, batches_ahead=1)


@pytest.mark.parametrize("fault", ["spike", "nonfinite"])
def test_on_spike_rollback_restores_the_last_good_state(runs_dir, monkeypatch, capsys, fault):
    """The snapshot is taken at log steps (every 4): a spike (or a NaN) at step 7 returns to step 4."""
    rolled, _ = run_simple(runs_dir, "rb", monkeypatch, f"{fault}=7", max_steps=7, on_spike="rollback")
    four, _ = run_simple(runs_dir, "four", monkeypatch, max_steps=4)
    assert rolled.health.rollbacks == 1 and rolled.step == 4
    assert "rolled back to the last good state" in capsys.readouterr().out
    same_member_state(rolled, four, batches_ahead=3)
    seven, _ = run_simple(runs_dir, "seven", monkeypatch, max_steps=7)
    assert rolled.lr == seven.lr  # the LR of the batch it is at


# -- plateau -------------------------------------------------------------------------------
def test_plateau_cuts_after_patience_down_to_the_floor():
    p = Plateau(patience=2, factor=0.5, min_lr=0.3)
    lrs, lr = [], 1.0
    for v in (1.0, 0.9, 0.9, 0.9, 0.95, 0.91, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5):
        if p.observe(v, lr):
            lr = p.scale  # a constant schedule: the LR is the scale
        lrs.append(lr)
    # best 0.9 at eval 2; evals 3 and 4 flat -> cut; 5, 6 flat -> cut to the 0.3 floor; 0.5
    # improves; 8-9 and 10-11 flat, but the floor is reached: no more cuts
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    assert p.cuts == 2
    off = Plateau(patience=0, factor=0.5, min_lr=0.0)
    assert not any(off.observe(1.0, 1.0) for _ in range(10))
    assert not p.observe(float("nan"), 0.3)


def test_plateau_scales_the_schedule_in_the_loop(runs_dir, capsys):
    """A model whose LR is too small to move the val loss: cuts at evaluations 3 and 5."""
    from trainlab.engine.train_config import lr_lambda

    cfg = tiny_train_config(runs_dir, max_steps=6, eval_every=1, lr=1e-9, plateau_patience=2, plateau_min_lr=0.0,
                            log_every=1, warmup_steps=2, lr_decay_steps=12)
    task, config = simple_only(cfg)
    run = new_run(cfg.runs_dir, task.name, "flat", "test", config)
    (m,) = train(task, cfg, run, config, echo=lambda *a: None).members
    assert m.plateau.cuts == 2 and m.plateau.scale == 0.25
    assert "val loss flat for 2 evaluations: LR" in capsys.readouterr().out
    assert m.lr == pytest.approx(1e-9 * lr_lambda(cfg)(6) * 0.25)
    assert [v for _, v in tb_scalars(run.dir / "simple", "health/lr_scale")] == [1, 1, 1, 0.5, 0.5, 0.25]


# -- all of it resumes exactly -----------------------------------------------------------------
def test_resume_continues_trend_spikes_plateau_and_micro_batches_exactly(runs_dir, monkeypatch):
    faults_spec = "oom=3,spike=5,nonfinite=9,spike=10"
    flags = ["--max-steps", "12", "--log-every", "2", "--eval-every", "2", "--save-every", "5", "--lr", "1e-6",
             "--loss-window", "4", "--on-spike", "rollback", "--plateau-patience", "1", "--plateau-min-lr", "0",
             "--recover-after", "3", "--warmup-steps", "2"]
    monkeypatch.setenv(faults.ENV, faults_spec)
    assert cli_train(runs_dir, *flags, "--run-name", "straight") == 0
    monkeypatch.setenv(faults.ENV, faults_spec + ",interrupt=7")
    assert cli_train(runs_dir, *flags, "--run-name", "broken") == 130
    monkeypatch.setenv(faults.ENV, faults_spec)
    assert cli_train(runs_dir, "--resume", "broken") == 0
    (sa, a), (sb, b) = final_state(runs_dir, "straight"), final_state(runs_dir, "broken")
    assert sa == sb == 12
    for member in ("simple", "latent"):
        ta, tb = a[f"{member}/train_state.pt"], b[f"{member}/train_state.pt"]
        assert ta["health"]["rollbacks"] >= 1 and ta["plateau"]["cuts"] >= 1 and ta["micro_batches"]["ooms"] == 1
        assert ta["health"]["skipped_nonfinite"] == 1
        for key in ("optimizer", "scheduler", "step", "losses", "trend", "plateau", "health", "micro_batches",
                    "precision"):
            assert_same_tensors(ta[key], tb[key], f"{member} {key}")
        assert_same_tensors(a[f"{member}/model.pt"], b[f"{member}/model.pt"], f"{member} weights")
        assert_same_tensors(a[f"{member}/snapshot.pt"], b[f"{member}/snapshot.pt"], f"{member} snapshot")
        for tag in ("train/loss", "train/loss_ema", "train/lr", "health/loss_spikes", "health/rollbacks"):
            assert tb_scalars(run_dir(runs_dir, "straight") / member, tag) == \
                tb_scalars(run_dir(runs_dir, "broken") / member, tag), tag


# -- ETA -----------------------------------------------------------------------------------------
def synthetic_times(n: int, seed: int = 0) -> list[float]:
    """0.2 s steps with +-10% noise, a 4x outlier about every 100 steps, and one 30 s stall."""
    rng = random.Random(seed)
    times = [0.2 * rng.uniform(0.9, 1.1) * (4.0 if rng.random() < 0.01 else 1.0) for _ in range(n)]
    times[300] = 30.0
    return times


def test_eta_stays_close_to_the_time_the_steps_take():
    times = synthetic_times(600)
    eta = Eta()
    previous_finish = None
    for k, t in enumerate(times):
        eta.add_step(t)
        done = k + 1
        if done < 30 or done >= 590:
            continue
        truth = sum(times[done:])
        unforeseeable = 30.0 if done <= 300 else 0.0  # the stall, while it is still ahead
        guess = eta.eta(600 - done)
        assert abs(guess - truth) <= 0.08 * truth + unforeseeable, (done, guess, truth)
        # the predicted finish (time so far + ETA) barely moves from one step to the next,
        # the stall included: it is the one step whose own time is off the scale
        finish = sum(times[:done]) + guess
        if previous_finish is not None and done != 301:
            assert abs(finish - previous_finish) <= 0.02 * previous_finish, done
        previous_finish = finish


def test_eta_follows_a_real_change_of_speed():
    eta = Eta()
    for _ in range(100):
        eta.add_step(0.1)
    for _ in range(60):  # e.g. twice as many micro-batches after an out-of-memory
        eta.add_step(0.3)
    assert eta.eta(100) == pytest.approx(30.0, rel=0.1)


def test_eta_adds_the_pauses_still_due_and_survives_a_resume():
    eta = Eta()
    for _ in range(20):
        eta.add_step(0.5)
    eta.add_pause("eval", 8.0)
    eta.add_pause("eval", 12.0)
    assert eta.eta(100, {"eval": 3, "save": 2}) == pytest.approx(50.0 + 3 * 10.0)  # no save measured yet
    again = Eta()
    again.load_state_dict(eta.state_dict())
    assert again.eta(100, {"eval": 3}) == eta.eta(100, {"eval": 3})
    assert Eta().eta(100) is None and eta.eta(None) is None
    assert eta.rate() == "2.00 it/s"


def test_due_counts_the_events_still_to_come():
    assert due(0, 10, 4) == 3  # 4, 8 and the end at 10
    assert due(8, 10, 4) == 1 and due(10, 10, 4) == 0
    assert due(0, 12, 4) == 3 and due(0, None, 4) == 0 and due(0, 10, 0) == 0
