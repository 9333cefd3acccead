"""Mixed precision: the choice per device, real autocast, non-finite steps skipped, the fp32 fall-back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_train_config
from helpers import assert_same_tensors, cli_train, run_dir, tb_scalars, tiny_multiply

from trainlab.config import ConfigError
from trainlab.engine import faults, precision
from trainlab.engine.checkpoint import latest_checkpoint
from trainlab.engine.loop import train
from trainlab.engine.precision import Precision, resolve_precision
from trainlab.engine.tracking import new_run

CPU = torch.device("cpu")


def test_auto_picks_by_what_the_device_does_fast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == name
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp8", CPU)


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


@pytest.mark.parametrize("fault", ["nonfinite", "nonfinite_grad"])
def test_a_non_finite_step_changes_nothing_but_is_counted(runs_dir, monkeypatch, fault):
    """Step 3's loss (or gradient) is poisoned: after it, weights, optimizer and schedule
    are exactly those of a run that stopped after step 2, and the skip is on record."""
    common = dict(lr_decay_steps=10, log_every=1, precision="fp32")
    skipped, run, _, _ = run_tiny(runs_dir, "skipped", f"{fault}=3", monkeypatch, max_steps=3, **common)
    monkeypatch.delenv(faults.ENV)
    two, run2, _, _ = run_tiny(runs_dir, "two", max_steps=2, **common)
    (m,), (m2,) = skipped.members, two.members
    assert skipped.step == 3 and m.step == 2 and m.health.skipped_nonfinite == 1
    assert_same_tensors(m.model.state_dict(), m2.model.state_dict(), "weights")
    assert_same_tensors(m.optimizer.state_dict(), m2.optimizer.state_dict(), "optimizer")
    assert m.scheduler.last_epoch == m2.scheduler.last_epoch == 2
    assert tb_scalars(run.dir / "simple", "health/skipped_nonfinite") == [(1, 0.0), (2, 0.0), (3, 1.0)]
    losses = [v for _, v in tb_scalars(run.dir / "simple", "train/loss")]
    assert len(losses) == 2 + (fault == "nonfinite_grad") and all(torch.isfinite(torch.tensor(losses)))
    saved = latest_checkpoint(run.checkpoints).tensors("simple/train_state.pt")
    assert saved["health"]["skipped_nonfinite"] == 1 and saved["step"] == 2


def test_repeated_non_finite_steps_fall_back_to_fp32_for_good(runs_dir, monkeypatch, capsys):
    summary, run, seen, lines = run_tiny(runs_dir, "fb", "nonfinite=2,nonfinite=3", monkeypatch, max_steps=5,
                                         precision="bf16", max_nonfinite=2)
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
