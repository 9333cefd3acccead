"""Stop a run any way you like, continue it, and get the run that never stopped."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from helpers import TINY, cli_train, run_dir, same_training, tb_scalars, tiny_multiply

from trainlab.cli import main
from trainlab.engine.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints
from trainlab.engine.errors import CheckpointError
from trainlab.engine.faults import DAMAGE_KINDS, damage_checkpoint, forge
from trainlab.engine.loop import train
from trainlab.engine.member import make_member
from trainlab.engine.state import restore
from trainlab.engine.tracking import Run, new_run

ROOT = Path(__file__).resolve().parents[1]
# dropout, scheduled sampling, a warmup and a log interval that interruptions fall inside of
FLAGS = ["--max-digits", "2", "--dropout", "0.1", "--tf-schedule", "linear", "--tf-floor", "0.3",
         "--tf-decay-steps", "8", "--warmup-steps", "3", "--log-every", "3", "--eval-every", "4", "--save-every", "5"]
TAGS = ["train/loss", "train/seq_accuracy", "train/lr", "train/teacher_forcing_prob", "val/exact_match"]


def same_curves(runs, a, b, tags=TAGS):
    """Every point of ``a``'s curves is in ``b``'s, steps strictly increasing. Training curves
    must match exactly; ``b`` may add a val point where it was stopped (Ctrl+C evaluates)."""
    for member in ("simple", "latent"):
        for tag in tags:
            ca, cb = tb_scalars(run_dir(runs, a) / member, tag), tb_scalars(run_dir(runs, b) / member, tag)
            steps = [s for s, _ in cb]
            assert steps == sorted(set(steps)), f"{member} {tag}: steps not strictly increasing: {steps}"
            if tag.startswith("val/"):
                assert set(ca) <= set(cb) and len(cb) - len(ca) <= 1, (member, tag, ca, cb)
            else:
                assert ca == cb, (member, tag)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import register_runs_dir

    runs = register_runs_dir(tmp_path_factory.mktemp("runs"))
    assert cli_train(runs, *FLAGS, "--max-steps", "14", "--run-name", "straight") == 0
    return runs


def copy_straight(straight, runs):
    shutil.copytree(run_dir(straight, "straight"), run_dir(runs, "straight"))


def test_interrupt_then_resume_is_bit_identical_to_an_unbroken_run(straight, runs_dir, monkeypatch, capsys):
    copy_straight(straight, runs_dir)
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=7")  # between log steps 6 and 9, between saves 5 and 10
    assert cli_train(runs_dir, *FLAGS, "--max-steps", "14", "--run-name", "halves") == 130
    assert latest_checkpoint(run_dir(runs_dir, "halves") / "checkpoints").step == 7
    monkeypatch.delenv("TRAINLAB_FAULTS")
    assert cli_train(runs_dir, "--resume", "halves") == 0  # no --max-steps: the run's own 14
    assert "resuming run halves from step 7" in capsys.readouterr().out
    same_training(runs_dir, "straight", "halves")
    same_curves(runs_dir, "straight", "halves")
    assert json.loads((run_dir(runs_dir, "halves") / "run.json").read_text())["status"] == "finished"


def test_gradient_checkpointing_changes_nothing_but_memory_and_may_change_on_resume(straight, runs_dir,
                                                                                     monkeypatch, capsys):
    """Half the run recomputes activations (dropout 0.1 included), the other half keeps
    them: weights, optimizer and curves are those of the straight run, bit for bit, and
    the checkpoints load either way."""
    copy_straight(straight, runs_dir)
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=7")
    assert cli_train(runs_dir, *FLAGS, "--max-steps", "14", "--run-name", "gc", "--grad-checkpointing") == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    ckpts = run_dir(runs_dir, "gc") / "checkpoints"
    assert latest_checkpoint(ckpts).json("simple/model_config.json")["grad_checkpointing"] is True
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "gc", "--no-grad-checkpointing") == 0
    assert "--grad-checkpointing: True -> False from here on" in capsys.readouterr().out
    assert latest_checkpoint(ckpts).json("latent/model_config.json")["grad_checkpointing"] is False
    same_training(runs_dir, "straight", "gc")
    same_curves(runs_dir, "straight", "gc")


def test_killed_anywhere_even_mid_save_resumes_to_the_same_weights_and_curves(straight, runs_dir):
    """Real SIGKILLs in subprocesses: after step 9 (last checkpoint 5, curves logged to 9),
    then in the middle of writing checkpoint 10; each time the run is continued."""
    copy_straight(straight, runs_dir)
    cmd = [sys.executable, "-m", "trainlab", "multiply", "train", "--runs-dir", str(runs_dir), *TINY, *FLAGS,
           "--max-steps", "14"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    first = subprocess.run([*cmd, "--run-name", "k"], env={**env, "TRAINLAB_FAULTS": "kill=9"}, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == -9, first.stderr
    ckpts = run_dir(runs_dir, "k") / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_0000005"]
    assert Run("k", "parallel_comparison", run_dir(runs_dir, "k")).effective_status() == "failed"
    second = subprocess.run([*cmd, "--resume", "k"], env={**env, "TRAINLAB_FAULTS": "kill_in_save=10"},
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == -9, second.stderr
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")]  # the save really was cut short
    assert latest_checkpoint(ckpts).step == 5
    assert cli_train(runs_dir, "--resume", "k") == 0
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # leftovers cleaned
    same_training(runs_dir, "straight", "k")
    same_curves(runs_dir, "straight", "k")


def test_resume_without_any_checkpoint_starts_the_run_over(straight, runs_dir, capsys):
    copy_straight(straight, runs_dir)
    assert cli_train(runs_dir, *FLAGS, "--max-steps", "14", "--run-name", "lost") == 0
    for ckpt in list_checkpoints(run_dir(runs_dir, "lost") / "checkpoints"):  # best/ stays: the restart settles it
        shutil.rmtree(ckpt)
    assert cli_train(runs_dir, "--resume", "lost") == 0
    assert "starting it over from step 0" in capsys.readouterr().out
    same_training(runs_dir, "straight", "lost")
    same_curves(runs_dir, "straight", "lost")  # the first attempt's events are purged, not doubled
    (a,), (b,) = (list_checkpoints(run_dir(runs_dir, r) / "checkpoints" / "best") for r in ("straight", "lost"))
    assert a.name == b.name and Checkpoint(a).meta["best"] == Checkpoint(b).meta["best"]


def test_a_conflicting_dimension_is_named_and_the_checkpoint_wins(runs_dir, capsys):
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "2", "--run-name", "dims") == 0
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "dims", "--d-model", "64", "--max-steps", "3") == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "--d-model" in x]
    assert "64" in line and "32" in line and "ignored" in line
    ck = latest_checkpoint(run_dir(runs_dir, "dims") / "checkpoints")
    assert ck.step == 3 and ck.json("simple/model_config.json")["d_model"] == 32


def test_max_steps_holds_across_resumes_and_can_be_extended(runs_dir, monkeypatch, capsys):
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=13")
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "20", "--run-name", "ms", "--log-every", "1",
                     "--warmup-steps", "2") == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    assert cli_train(runs_dir, "--resume", "ms") == 0
    ckpts = run_dir(runs_dir, "ms") / "checkpoints"
    assert latest_checkpoint(ckpts).step == 20
    # the ETA's window of step times came through the interruption (13 before, 7 after)
    assert len(latest_checkpoint(ckpts).tensors("trainer.pt")["loop"]["eta"]["times"]) == 20
    assert latest_checkpoint(ckpts).tensors("simple/train_state.pt")["step"] == 20
    assert cli_train(runs_dir, "--resume", "ms", "--max-steps", "26") == 0
    ck = latest_checkpoint(ckpts)
    assert ck.step == 26 and ck.tensors("latent/train_state.pt")["optimizer"]["state"][0]["step"].item() == 26
    # the schedule was fixed when the run started: extra steps run at the final LR, no jump
    lrs = dict(tb_scalars(run_dir(runs_dir, "ms") / "simple", "train/lr"))
    assert all(lrs[s] == pytest.approx(lrs[20]) for s in range(21, 27))
    assert lrs[20] == pytest.approx(1e-3 * 0.1)
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "ms", "--max-steps", "10") == 0
    assert "already at step 26" in capsys.readouterr().out
    assert latest_checkpoint(ckpts).step == 26


def test_resume_auto_picks_the_newest_unfinished_run_with_the_same_tag(runs_dir, monkeypatch, capsys):
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=2")
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "4", "--run-name", "older") == 130
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "4", "--run-name", "newer") == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "4", "--run-name", "done") == 0
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "auto") == 0
    assert "resuming run newer from step 2" in capsys.readouterr().out
    assert cli_train(runs_dir, "--resume", "auto") == 0
    assert "resuming run older from step 2" in capsys.readouterr().out
    assert cli_train(runs_dir, "--resume", "auto", "--max-steps", "1") == 0  # nothing left: a new run
    assert "starting a new run" in capsys.readouterr().out
    assert len(list((runs_dir / "parallel_comparison").iterdir())) == 4


def one_line(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_resume_errors_are_one_line_and_write_nothing(runs_dir, capsys):
    code, err = one_line(capsys, ["multiply", "train", "--runs-dir", str(runs_dir), "--resume", "ghost"])
    assert code == 2 and len(err.splitlines()) == 1 and "no run 'ghost'" in err
    assert not runs_dir.exists()
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "2", "--run-name", "busy") == 0
    holder = Run("busy", "parallel_comparison", run_dir(runs_dir, "busy"))
    holder.acquire()  # as if another process were training it
    before = sorted(p.name for p in (run_dir(runs_dir, "busy") / "checkpoints").iterdir())
    try:
        code, err = one_line(capsys, ["multiply", "train", "--runs-dir", str(runs_dir), "--resume", "busy"])
    finally:
        holder.release()
    assert code == 2 and "in use" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (run_dir(runs_dir, "busy") / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_a_damaged_newest_checkpoint_is_reported_kept_and_the_previous_one_used(runs_dir, tmp_path, capsys, kind):
    common = ["--max-digits", "1", "--save-every", "2", "--lr-decay-steps", "6", "--keep-checkpoints", "5"]
    assert cli_train(runs_dir, *common, "--max-steps", "8", "--run-name", "ref") == 0
    assert cli_train(runs_dir, *common, "--max-steps", "6", "--run-name", "c") == 0
    ckpts = run_dir(runs_dir, "c") / "checkpoints"
    damage_checkpoint(ckpts / "step_0000006", kind, tmp_path / "pwned")
    damaged = {p.relative_to(ckpts / "step_0000006"): p.read_bytes() for p in (ckpts / "step_0000006").rglob("*")
               if p.is_file()}
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "c", "--max-steps", "8") == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "step_0000006" in line]
    assert len(warnings) == 1, err
    assert "resuming run c from step 4" in out
    (aside,) = [p for p in ckpts.iterdir() if p.name.startswith("damaged-step_0000006")]
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == damaged
    assert not (tmp_path / "pwned").exists()
    same_training(runs_dir, "ref", "c")


def test_a_checkpoint_with_another_vocabulary_is_refused(runs_dir):
    cfg = tiny_train_config(runs_dir, max_steps=2)
    task, config = tiny_multiply(cfg)
    run = new_run(cfg.runs_dir, task.name, "v", "test", config)
    train(task, cfg, run, config, echo=lambda *a: None)
    ck_path = latest_checkpoint(run.checkpoints).path
    vocab = json.loads((ck_path / "vocab.json").read_text())
    vocab["tokens"][4], vocab["tokens"][5] = vocab["tokens"][5], vocab["tokens"][4]
    forge(ck_path, "vocab.json", json.dumps(vocab).encode())
    members = [make_member(n, m, cfg) for n, m in task.build_models().items()]
    with pytest.raises(CheckpointError, match="vocab.json differs"):
        restore(Checkpoint(ck_path, task.name), task, members, torch.device("cpu"))


def test_save_every_minutes_saves_on_wall_clock_time(runs_dir):
    cfg = tiny_train_config(runs_dir, max_steps=4, save_every=1000, save_every_minutes=1e-9, keep_checkpoints=10)
    task, config = tiny_multiply(cfg)
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    train(task, cfg, run, config, echo=lambda *a: None)
    assert [latest_checkpoint(p.parent).step for p in list_checkpoints(run.checkpoints)[-1:]] == [4]
    assert [p.name for p in list_checkpoints(run.checkpoints)] == [f"step_000000{i}" for i in (1, 2, 3, 4)]


def test_the_best_checkpoint_is_kept_apart_from_the_newest_k(runs_dir):
    cfg = tiny_train_config(runs_dir, max_steps=10, eval_every=2, save_every=1, keep_checkpoints=1, lr=3e-3)
    task, config = tiny_multiply(cfg)
    run = new_run(cfg.runs_dir, task.name, "", "test", config)
    summary = train(task, cfg, run, config, echo=lambda *a: None)
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step_0000010"]
    scores = {}
    for a, b in zip(summary.members[0].evals, summary.members[1].evals):
        scores.setdefault(a["step"], (a["exact_match"] + b["exact_match"]) / 2)
    best_step = max(scores, key=lambda s: (scores[s], -s))  # the first step reaching the top score
    (best,) = list_checkpoints(run.checkpoints / "best")
    ck = Checkpoint(best, task.name)
    ck.verify()
    assert ck.step == best_step and ck.meta["best"]["value"] == pytest.approx(scores[best_step])
    assert ck.meta["best"]["metric"] == "exact_match" and ck.tensors("simple/model.pt")


def test_a_bad_flag_on_resume_changes_nothing_on_disk(runs_dir, capsys):
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "4", "--save-every", "2", "--run-name", "b") == 0
    ckpts = run_dir(runs_dir, "b") / "checkpoints"
    (ckpts / "step_0000004" / "trainer.pt").write_bytes(b"torn")
    before = sorted(str(p.relative_to(runs_dir)) for p in runs_dir.rglob("*"))
    code, err = one_line(capsys, ["multiply", "train", "--runs-dir", str(runs_dir), "--resume", "b",
                                  "--max-steps", "-3"])
    assert code == 2 and "--max-steps" in err and len(err.splitlines()) == 1
    assert sorted(str(p.relative_to(runs_dir)) for p in runs_dir.rglob("*")) == before


def test_an_option_the_saved_run_lacks_applies_if_resumable_else_is_named(runs_dir, capsys):
    """A run saved before an option existed: a resumable one applies, any other is named in
    one warning and the run keeps what it was built with (the option's default)."""
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "2", "--run-name", "old") == 0
    ck = latest_checkpoint(run_dir(runs_dir, "old") / "checkpoints")
    config = ck.json("config.json")
    del config["train"]["embed_lr"], config["train"]["micro_batch"]
    forge(ck.path, "config.json", json.dumps(config).encode())
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "old", "--max-steps", "3", "--embed-lr", "0.5", "--micro-batch", "off") == 0
    out, err = capsys.readouterr()
    (warning,) = [line for line in err.splitlines() if "--embed-lr" in line]
    assert "0.5 ignored" in warning and "before the option existed" in warning
    assert any(line.startswith("--micro-batch: off from here on") for line in out.splitlines()), out
    saved = latest_checkpoint(run_dir(runs_dir, "old") / "checkpoints").json("config.json")["train"]
    assert saved["micro_batch"] == "off" and saved["embed_lr"] is None


def test_an_open_ended_run_given_max_steps_on_resume_keeps_its_lr(runs_dir, monkeypatch, capsys):
    """Started without --max-steps, the LR is constant after warm-up; a resume that sets
    --max-steps says where to stop and does not start a decay mid-run (the LR would drop at once)."""
    monkeypatch.setenv("TRAINLAB_FAULTS", "interrupt=6")
    assert cli_train(runs_dir, "--max-digits", "1", "--run-name", "open", "--log-every", "1", "--warmup-steps", "2",
                     "--lr", "0.002") == 130
    monkeypatch.delenv("TRAINLAB_FAULTS")
    capsys.readouterr()
    assert cli_train(runs_dir, "--resume", "open", "--max-steps", "10") == 0
    assert "started without --max-steps" in capsys.readouterr().out
    lrs = dict(tb_scalars(run_dir(runs_dir, "open") / "simple", "train/lr"))
    assert sorted(lrs) == list(range(1, 11))
    assert all(lrs[s] == pytest.approx(0.002) for s in range(3, 11)), lrs
    assert latest_checkpoint(run_dir(runs_dir, "open") / "checkpoints").step == 10
