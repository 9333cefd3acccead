import json
import os
import signal

import pytest
import torch
from conftest import tiny_train_config
from helpers import tiny_multiply

from trainlab.engine.checkpoint import latest_checkpoint, list_checkpoints
from trainlab.engine.loop import train
from trainlab.engine.monitor import Eta
from trainlab.engine.tracking import new_run
from trainlab.engine.train_config import TrainConfig, lr_lambda


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)
    const = lr_lambda(TrainConfig(max_steps=None, warmup_steps=0))
    assert const(0) == const(10**6) == 1.0


def test_training_stops_at_exactly_max_steps(runs_dir):
    cfg = tiny_train_config(runs_dir, max_steps=7, save_every=3, eval_every=5)
    task, config = tiny_multiply(cfg)
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    summary = train(task, cfg, run, config, echo=lambda *a: None)
    assert summary.step == 7 and not summary.interrupted
    assert [m.step for m in summary.members] == [7, 7]
    assert [m.optimizer.state_dict()["state"][0]["step"].item() for m in summary.members] == [7, 7]
    # saves at 3 and 6 and at the end; evaluations at 5 and at the end
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step_0000003", "step_0000006", "step_0000007"]
    assert [e["step"] for e in summary.members[0].evals] == [5, 7]
    info = json.loads((run.dir / "run.json").read_text())
    assert info["status"] == "finished" and info["tag"] == "test"
    assert (run.dir / "simple").is_dir() and (run.dir / "latent").is_dir()
    assert (run.dir / "report.md").is_file()


def test_checkpoint_is_self_describing(runs_dir):
    cfg = tiny_train_config(runs_dir, max_steps=2)
    task, config = tiny_multiply(cfg)
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    train(task, cfg, run, config, echo=lambda *a: None)
    ck = latest_checkpoint(run.checkpoints, task.name)
    assert ck.json("simple/model_config.json")["kind"] == "simple"
    assert ck.json("latent/model_config.json")["num_latent"] == 2
    assert ck.json("vocab.json")["tokens"][:3] == ["<pad>", "<bos>", "<eos>"]
    assert ck.json("config.json")["data"]["max_digits"] == 1
    state = ck.tensors("trainer.pt")
    assert state["step"] == 2 and "torch" in state["rng"] and "forced_batches" in state["task"]
    member = ck.tensors("latent/train_state.pt")
    assert member["step"] == 2 and member["optimizer"]["state"]


def test_members_see_the_same_batches_and_teacher_forcing_coins(runs_dir):
    cfg = tiny_train_config(runs_dir)
    task, _ = tiny_multiply(cfg)
    assert torch.equal(task.batch(5)["src"], task.batch(5)["src"])
    assert not torch.equal(task.batch(5)["src"], task.batch(6)["src"])
    from trainlab.multiply.config import TeacherForcingConfig
    task2, _ = tiny_multiply(cfg, tf=TeacherForcingConfig("linear", tf_floor=0.0, tf_decay_steps=10))
    coins = [task2.teacher_forced(s) for s in range(40)]
    assert coins == [task2.teacher_forced(s) for s in range(40)]
    assert not all(coins[15:]) and coins[0]


def test_scheduled_sampling_batches_train(runs_dir):
    from trainlab.multiply.config import TeacherForcingConfig
    cfg = tiny_train_config(runs_dir, max_steps=4)
    task, config = tiny_multiply(cfg, tf=TeacherForcingConfig("linear", tf_floor=0.0, tf_decay_steps=1))
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    train(task, cfg, run, config, echo=lambda *a: None)
    assert task.sampled_batches == 3 and task.forced_batches == 1  # step 0 forced, then p = 0


def test_ctrl_c_stops_at_a_step_boundary_and_saves(runs_dir):
    cfg = tiny_train_config(runs_dir, max_steps=None, save_every=1000)
    task, config = tiny_multiply(cfg)
    original = task.loss

    def loss(member, model, batch, step):
        if step == 4 and member == "simple":
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two members' updates
        return original(member, model, batch, step)

    task.loss = loss
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    summary = train(task, cfg, run, config, echo=lambda *a: None)
    assert summary.interrupted and summary.step == 5
    assert [m.step for m in summary.members] == [5, 5]  # neither member left half a step ahead
    assert latest_checkpoint(run.checkpoints, task.name).step == 5
    assert json.loads((run.dir / "run.json").read_text())["status"] == "interrupted"
    assert (run.dir / "report.md").is_file()


def test_step_timer_ignores_stalls():
    t = Eta(window=20)
    for i in range(20):
        t.add_step(30.0 if i % 7 == 0 else 0.1)  # a few evaluation-length stalls
    assert t.seconds_per_step() == pytest.approx(0.1)
    assert t.eta(100) == pytest.approx(10.0)
    assert t.eta(None) is None


def test_training_on_from_a_checkpoint_matches_an_unbroken_run(runs_dir):
    """The engine's restore(): N steps, then N more from the checkpoint == 2N straight."""
    from trainlab.multiply.config import TeacherForcingConfig

    tf = TeacherForcingConfig("linear", tf_floor=0.3, tf_decay_steps=6)
    straight_cfg = tiny_train_config(runs_dir, max_steps=8, save_every=4, lr_decay_steps=8)
    task, config = tiny_multiply(straight_cfg, tf=tf, dropout=0.1)
    run = new_run(straight_cfg.runs_dir, task.name, "straight", "test", config)
    straight = train(task, straight_cfg, run, config, echo=lambda *a: None)

    half_cfg = tiny_train_config(runs_dir, max_steps=4, save_every=4, lr_decay_steps=8)
    task2, config2 = tiny_multiply(half_cfg, tf=tf, dropout=0.1)
    run2 = new_run(half_cfg.runs_dir, task2.name, "halves", "test", config2)
    train(task2, half_cfg, run2, config2, echo=lambda *a: None)
    task3, _ = tiny_multiply(straight_cfg, tf=tf, dropout=0.1)
    resumed = train(task3, straight_cfg, run2, config, resume=latest_checkpoint(run2.checkpoints, task3.name),
                    echo=lambda *a: None)
    assert resumed.step == 8
    for a, b in zip(straight.members, resumed.members):
        assert a.step == b.step == 8
        for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            assert torch.equal(v, v2), (a.name, k)
        assert a.losses == b.losses
    assert (task.forced_batches, task.sampled_batches) == (task3.forced_batches, task3.sampled_batches)


def test_a_failing_run_is_marked_failed_keeps_its_curves_and_frees_its_lock(runs_dir):
    from helpers import tb_scalars

    cfg = tiny_train_config(runs_dir, max_steps=10, log_every=1)
    task, config = tiny_multiply(cfg)
    original = task.loss

    def loss(member, model, batch, step):
        if step == 3:
            raise RuntimeError("boom")
        return original(member, model, batch, step)

    task.loss = loss
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    with pytest.raises(RuntimeError, match="boom"):
        train(task, cfg, run, config, echo=lambda *a: None)
    assert json.loads((run.dir / "run.json").read_text())["status"] == "failed"
    assert [s for s, _ in tb_scalars(run.dir / "simple", "train/loss")] == [1, 2, 3]
    assert not run.in_use()


def test_the_wsd_schedule_warms_up_holds_and_decays_linearly_at_the_end():
    from trainlab.engine.train_config import TrainConfig, lr_lambda

    cfg = TrainConfig(max_steps=110, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert all(f(s) == 1.0 for s in range(10, 91))  # stable through 80% of the steps after warmup
    assert f(100) == pytest.approx(0.1 + 0.9 * 0.5) and f(110) == pytest.approx(0.1)
    assert f(95) > f(100) > f(105)
    cosine = lr_lambda(TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert cosine(60) == pytest.approx(0.55) and cosine(30) < 1.0  # the cosine starts down at once
    from trainlab.config import ConfigError

    for bad in (dict(schedule="linear"), dict(decay_fraction=0.0), dict(decay_fraction=1.5)):
        with pytest.raises(ConfigError):
            TrainConfig(max_steps=10, **bad)
