"""Hostile use: stop signals, bad numbers, seeds and sizes, damaged files and folders, odd
names and problems. Each case ends in one line and a clear exit status, never a traceback,
and never loses or overwrites a user's data."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import chat_train, cli_train, final_state, made_up_text, run_dir

from trainlab.cli import main
from trainlab.engine import faults
from trainlab.engine.checkpoint import latest_checkpoint

FLAGS = ["--max-digits", "2", "--max-steps", "12", "--save-every", "4", "--eval-every", "6", "--dropout", "0.1"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainlab") and ": error: " in err[0], err
    assert "Traceback" not in err[0]
    return err[0]


def runs_in(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.glob("*/*") if p.is_dir() and not p.name.startswith("."))


def forge(folder: Path, name: str, data: bytes, meta_edit=None) -> None:
    """Rewrite a checkpoint file and its checksum (and optionally meta.json itself)."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    if meta_edit:
        meta_edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


# -- 1. stop signals -------------------------------------------------------------------------
def test_a_sigterm_at_a_random_step_then_resume_is_bit_identical(runs_dir, monkeypatch, capsys):
    """A real SIGTERM (sent by the process to itself once S steps are done): the step is
    finished, a checkpoint saved, the run marked interrupted, exit 143; resumed, it ends
    with the weights and optimizer of an unbroken run, bit for bit."""
    s = random.Random(19).randint(1, 11)
    assert cli_train(runs_dir, *FLAGS, "--run-name", "whole") == 0
    monkeypatch.setenv(faults.ENV, f"sigterm={s}")
    assert cli_train(runs_dir, *FLAGS, "--run-name", "halves") == 143
    out = capsys.readouterr().out
    assert "SIGTERM: stopping after this step and saving" in out and f"interrupted at step {s} (SIGTERM)" in out
    assert json.loads((run_dir(runs_dir, "halves") / "run.json").read_text())["status"] == "interrupted"
    assert latest_checkpoint(run_dir(runs_dir, "halves") / "checkpoints").step == s
    monkeypatch.delenv(faults.ENV)
    assert cli_train(runs_dir, "--resume", "halves") == 0
    from helpers import same_training

    same_training(runs_dir, "whole", "halves")  # weights, optimizer, schedule, losses: wall times aside
    assert final_state(runs_dir, "halves")[0] == 12


def test_a_second_sigterm_aborts_without_saving(runs_dir, monkeypatch, capsys):
    monkeypatch.setenv(faults.ENV, "sigterm_twice=6")
    assert cli_train(runs_dir, *FLAGS, "--run-name", "twice") == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "trainlab: aborted"
    assert latest_checkpoint(run_dir(runs_dir, "twice") / "checkpoints").step == 4  # the last regular save
    assert json.loads((run_dir(runs_dir, "twice") / "run.json").read_text())["status"] == "interrupted"


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(faults.ENV, None)
    return subprocess.Popen([sys.executable, "-m", "trainlab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 60.0) -> None:
    t = time.monotonic()
    while not predicate():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.02)


def test_sigterm_from_outside_mid_run_and_right_after_launch(runs_dir):
    """From another process, as a scheduler sends it: mid-run the run stops saved (143);
    during start-up (importing PyTorch) the command leaves with one line, no traceback."""
    p = spawn("multiply", "train", "--runs-dir", str(runs_dir), "--d-model", "32", "--num-layers", "1",
              "--batch-size", "8", "--max-steps", "100000", "--no-progress", "--tag", "test", "--run-name", "ext",
              "--device", "cpu", "--save-every", "100000", "--log-every", "1")
    info = run_dir(runs_dir, "ext") / "run.json"
    wait_for(lambda: info.is_file() and json.loads(info.read_text()).get("status") == "running")
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    state = json.loads(info.read_text())
    ck = latest_checkpoint(run_dir(runs_dir, "ext") / "checkpoints")
    assert state["status"] == "interrupted" and ck.step == state["step"] > 0
    assert "continue with --resume ext" in out

    # -X importtime writes a line as each module's import completes: a torch submodule's line
    # means the import of torch itself is under way (its own line comes last)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(faults.ENV, None)
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "trainlab", "multiply", "train", "--runs-dir",
                          str(runs_dir), "--run-name", "early", "--max-steps", "1", "--no-progress"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().startswith("torch."):
            break
    else:
        raise AssertionError("no torch import seen: " + "".join(seen[-5:]))
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    lines = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert p.returncode == 130, (p.returncode, lines[-5:])
    assert lines == ["trainlab: aborted"], lines[-5:]
    assert not run_dir(runs_dir, "early").exists()


def test_generate_leaves_cleanly_on_sigterm(runs_dir, tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    assert chat_train(runs_dir, corpus, "--run-name", "gen", "--max-steps", "2") == 0
    p = spawn("chat", "generate", "--checkpoint", "gen", "--runs-dir", str(runs_dir), "--max-new-tokens", "100000",
              "--device", "cpu", "--seed", "1", "--decode", "plain")
    assert p.stdout.read(20)  # it is generating
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip().splitlines() == ["trainlab: aborted"], err[-2000:]


def test_a_stop_during_set_up_leaves_no_empty_run(runs_dir, monkeypatch, capsys):
    """Ctrl+C before the first step of a new run: nothing to keep, so no folder and no row."""
    from trainlab.multiply import task as multiply_task

    built = multiply_task.MultiplyTask.build_models

    def build_then_interrupt(self):
        os.kill(os.getpid(), signal.SIGINT)
        return built(self)

    monkeypatch.setattr(multiply_task.MultiplyTask, "build_models", build_then_interrupt)
    assert cli_train(runs_dir, "--max-steps", "5", "--run-name", "early") == 130
    assert "run early held nothing and was removed" in capsys.readouterr().out
    assert not run_dir(runs_dir, "early").exists()
    assert "parallel_comparison/early" not in json.loads((runs_dir / "index.json").read_text())["runs"]


# -- 2. defects found by hostile use ------------------------------------------------------------
def test_runs_rm_refuses_the_runs_folder_and_task_folders(runs_dir, capsys):
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "keep") == 0
    info = run_dir(runs_dir, "keep") / "run.json"
    for folder in (runs_dir, runs_dir / "parallel_comparison"):
        (folder / "run.json").write_bytes(info.read_bytes())
        assert main(["runs", "rm", "--runs-dir", str(runs_dir), str(folder)]) == 2
        assert "not a run folder" in one_error_line(capsys)
    assert run_dir(runs_dir, "keep").is_dir() and (runs_dir / "index.json").is_file()


@pytest.mark.parametrize("name", ["/dev/zero", "../../../../etc/passwd", "simple/../../run.json", "link.pt"])
def test_checkpoint_file_names_are_confined_to_the_checkpoint(runs_dir, capsys, name):
    assert cli_train(runs_dir, "--max-steps", "2", "--save-every", "1", "--run-name", "m") == 0
    ck = latest_checkpoint(run_dir(runs_dir, "m") / "checkpoints").path
    if name == "link.pt":
        (ck / name).symlink_to("/dev/zero")
    meta = json.loads((ck / "meta.json").read_text())
    meta["sha256"][name] = "0" * 64
    (ck / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["multiply", "ask", "m", "3*4", "--runs-dir", str(runs_dir)]) == 0  # the step-1 one answers
    assert "3*4 = 12  (checkpoint step 1)" in capsys.readouterr().out
    assert main(["multiply", "ask", str(ck), "3*4"]) == 2
    line = one_error_line(capsys)
    assert "outside the checkpoint" in line or "not a regular file" in line
    # resumed: the forged checkpoint is set aside and the previous one used
    assert cli_train(runs_dir, "--resume", "m", "--max-steps", "3") == 0
    assert latest_checkpoint(run_dir(runs_dir, "m") / "checkpoints").step == 3


@pytest.mark.parametrize("flags", [
    ["--weight-decay", "nan"], ["--grad-clip", "nan"], ["--seq-weight", "nan"], ["--spike-sigma", "nan"],
    ["--save-every-minutes", "nan"], ["--lr", "inf"], ["--lr", "nan"], ["--dropout=-inf"],
    ["--seed", "-1"], ["--seed", str(2**70)], ["--max-steps", "1e12"], ["--max-steps", ""],
    ["--keep-checkpoints", "0"], ["--run-name", "abc\n"], ["--d-model", "1000000000", "--nhead", "1"],
    ["--device", "cuda:x"],
])
def test_bad_numbers_names_and_sizes_are_one_line_and_leave_nothing(runs_dir, capsys, flags):
    assert cli_train(runs_dir, "--max-steps", "2", *flags) == 2
    line = one_error_line(capsys)
    assert len(line) < 500
    assert runs_in(runs_dir) == []


def test_a_nan_in_a_config_file_is_refused(runs_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: .nan\n")
    assert cli_train(runs_dir, "--config", str(cfg)) == 2
    assert "--lr: must be a finite number" in one_error_line(capsys)
    assert runs_in(runs_dir) == []


@pytest.mark.parametrize("content", ["fifo", "/dev/zero", "bomb", "big", "folder"])
def test_config_files_that_never_end_are_refused(runs_dir, tmp_path, capsys, content):
    path = tmp_path / "c.yaml"
    if content == "fifo":
        os.mkfifo(path)
    elif content == "/dev/zero":
        path = Path("/dev/zero")
    elif content == "bomb":
        lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
        path.write_text("\n".join(lines) + "\n")
    elif content == "big":
        path.write_text("# " + "x" * (2 << 20))
    else:
        path.mkdir()
    t = time.monotonic()
    assert cli_train(runs_dir, "--config", str(path)) == 2
    assert time.monotonic() - t < 10
    one_error_line(capsys)
    assert runs_in(runs_dir) == []


def test_sampling_numbers_must_be_finite(runs_dir, tmp_path, capsys):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    assert chat_train(runs_dir, corpus, "--run-name", "s", "--max-steps", "1") == 0
    capsys.readouterr()
    for flags in (["--temperature", "nan"], ["--temperature", "inf"], ["--repetition-penalty", "nan"],
                  ["--top-p", "nan"], ["--seed", "-1"]):
        assert main(["chat", "generate", "--checkpoint", "s", "--runs-dir", str(runs_dir), *flags]) == 2, flags
        assert flags[0] in one_error_line(capsys), flags
    # against a run that exists, so that the seed is what is refused
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "ev") == 0
    capsys.readouterr()
    assert main(["multiply", "evaluate", "ev", "--seed", "-1", "--runs-dir", str(runs_dir)]) == 2
    assert "--seed" in one_error_line(capsys)
    assert main(["multiply", "evaluate", "ev", "--seed", "1", "--n", "5", "--runs-dir", str(runs_dir)]) == 0


def test_a_checkpoint_whose_model_cannot_be_allocated_is_one_line(runs_dir, capsys):
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "huge") == 0
    ck = latest_checkpoint(run_dir(runs_dir, "huge") / "checkpoints").path
    cfg = json.loads((ck / "simple/model_config.json").read_text())
    cfg.update(d_model=2**20, nhead=1, dim_feedforward=2**20)
    forge(ck, "simple/model_config.json", json.dumps(cfg).encode())
    capsys.readouterr()
    assert main(["multiply", "ask", "huge", "3*4", "--runs-dir", str(runs_dir)]) == 2
    assert "parameters" in one_error_line(capsys)


def test_step_in_meta_must_be_a_count(runs_dir, capsys):
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "neg") == 0
    ck = latest_checkpoint(run_dir(runs_dir, "neg") / "checkpoints").path
    meta = json.loads((ck / "meta.json").read_text())
    meta["step"] = -5
    (ck / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["multiply", "ask", str(ck), "3*4"]) == 2
    assert "unreadable meta.json (step -5)" in one_error_line(capsys)


def test_filesystem_errors_mid_run_are_one_line_and_keep_earlier_checkpoints(runs_dir, monkeypatch, capsys):
    from trainlab.engine import checkpoint

    real, calls = checkpoint._write_bytes, []

    def write(path, data):
        calls.append(path)
        if "step_0000008" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write_bytes", write)
    assert cli_train(runs_dir, *FLAGS, "--run-name", "ro") == 1
    assert "Permission denied" in capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads((run_dir(runs_dir, "ro") / "run.json").read_text())["status"] == "failed"
    assert latest_checkpoint(run_dir(runs_dir, "ro") / "checkpoints").step == 4  # the save before is intact


def test_runs_folder_oddities(runs_dir, tmp_path, monkeypatch, capsys):
    # a missing folder is not created by listing it
    missing = tmp_path / "nowhere"
    assert main(["runs", "list", "--runs-dir", str(missing)]) == 0 and not missing.exists()
    # a file where the runs folder should be
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli_train(a_file, "--max-steps", "1") == 2
    assert "is not a folder" in one_error_line(capsys)
    assert main(["runs", "list", "--runs-dir", str(a_file)]) == 2
    one_error_line(capsys)
    # a damaged run.json is skipped, a folder named index.json set aside, and the list still works
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "good") == 0
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "bad") == 0
    info = run_dir(runs_dir, "bad") / "run.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "created": [1]}))
    (runs_dir / "index.json").unlink()
    (runs_dir / "index.json").mkdir()
    capsys.readouterr()
    assert main(["runs", "list", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and " bad " not in out
    assert (runs_dir / "index.json").is_file() and list(runs_dir.glob("index.json.not-a-file-*"))
    # `runs rm .` from inside a run folder
    monkeypatch.chdir(run_dir(runs_dir, "good"))
    assert main(["runs", "rm", ".", "--runs-dir", str(runs_dir)]) == 0
    monkeypatch.chdir(tmp_path)
    assert not run_dir(runs_dir, "good").exists()


def test_a_read_only_runs_folder_is_read_not_locked(runs_dir, monkeypatch, capsys):
    """Root ignores permissions, so a read-only folder is simulated where it bites: the lock
    file cannot be opened for writing."""
    from trainlab.engine import tracking

    assert cli_train(runs_dir, "--max-steps", "2", "--run-name", "ro", "--max-steps", "2") == 0
    capsys.readouterr()

    def no_lock(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tracking, "file_lock", no_lock)
    monkeypatch.setattr(tracking.os, "access", lambda path, mode: False)
    assert main(["runs", "list", "--runs-dir", str(runs_dir)]) == 0
    assert "ro" in capsys.readouterr().out
    assert cli_train(runs_dir, "--resume", "ro", "--max-steps", "3") == 2
    assert "not writable" in one_error_line(capsys)


def test_a_relative_corpus_path_is_stored_absolute(runs_dir, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "play.txt").write_text(made_up_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "a")
    assert chat_train(runs_dir, "play.txt", "--run-name", "rel", "--max-steps", "2") == 0
    saved = json.loads((runs_dir / "chat" / "rel" / "run.json").read_text())["config"]["data"]["text"]
    assert saved == str(tmp_path / "a" / "play.txt")
    monkeypatch.chdir(tmp_path)
    from helpers import chat_resume

    assert chat_resume(runs_dir, "rel", "--max-steps", "3") == 0


@pytest.mark.parametrize("problem, says", [
    ("9" * 100_000 + "*2", "between 1 and"), ("٣*٤", "ASCII digits"), ("3*４", "ASCII digits"),
    ("-3*4", "no signs"), ("0*5", "between 1 and"),
])
def test_odd_problems_are_one_line(runs_dir, capsys, problem, says):
    assert cli_train(runs_dir, "--max-steps", "1", "--run-name", "p") == 0
    capsys.readouterr()
    assert main(["multiply", "ask", "p", problem, "--runs-dir", str(runs_dir)]) == 2
    assert says in one_error_line(capsys)


# -- 4. small correctness items ----------------------------------------------------------------
def test_top_p_keeps_exactly_the_tied_tokens_that_reach_p():
    from trainlab.chat.sampling import apply_top_p

    kept = torch.isfinite(apply_top_p(torch.zeros(100), 0.25))
    assert int(kept.sum()) == 25 and kept[:25].all()  # ties ranked by id, lowest first
    kept = torch.isfinite(apply_top_p(torch.zeros(3), 0.5))
    assert kept.tolist() == [True, True, False]


def test_diversity_of_a_too_short_sample_is_not_defined():
    import math

    from trainlab.chat.metrics import distinct_n, diversity, words

    assert math.isnan(distinct_n(words("one two"), 3)) and distinct_n(words("one two"), 2) == 1.0
    d = diversity("hello")
    assert d["distinct_1"] == 1.0 and math.isnan(d["distinct_2"]) and math.isnan(d["repeat_4"])


def test_an_empty_val_split_is_refused_before_anything_is_written(runs_dir, capsys):
    """--val-fraction 0 once trained until the first evaluation and ended in a ZeroDivisionError."""
    assert cli_train(runs_dir, "--max-steps", "4", "--val-fraction", "0") == 2
    assert "--val-fraction" in one_error_line(capsys) and runs_in(runs_dir) == []


def test_large_digit_ranges_start_within_seconds(runs_dir, capsys):
    """5-digit operands are 8.1e9 problems: their splits are not counted one by one (that took
    over a minute before the first step); the counts shown are the expected ones."""
    from trainlab.multiply.config import MultiplyDataConfig
    from trainlab.multiply.data import EXACT_COUNT_LIMIT, MultiplicationDataset

    t = time.monotonic()
    assert cli_train(runs_dir, "--min-digits", "5", "--max-digits", "5", "--max-steps", "2", "--eval-every", "2",
                     "--test-n", "20", "--run-name", "five") == 0
    assert time.monotonic() - t < 60
    out = capsys.readouterr().out
    assert "problems: about 7,857,000,000 train, 81,000,000 val, 162,000,000 test" in out
    ds = MultiplicationDataset(MultiplyDataConfig(min_digits=5, max_digits=5))
    assert not ds.counts_exact and ds.size > EXACT_COUNT_LIMIT
    idx = ds.subset("val", 200, seed=1)
    assert len(set(idx.tolist())) == 200 and (ds.split_of(idx) == 1).all()
    a, b = ds.pairs(idx)
    assert (a >= 10_000).all() and (b <= 99_999).all()
    small = MultiplicationDataset(MultiplyDataConfig(min_digits=1, max_digits=3))
    assert small.counts_exact and sum(small.split_counts().values()) == small.size
