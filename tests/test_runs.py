"""The runs index, run locks, and `trainlab runs list|clean|rm`."""

import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from trainlab.cli import main
from trainlab.engine.tracking import RunsIndex, Run, find_run, new_run, write_json_atomic
from helpers import cli_train

ROOT = Path(__file__).resolve().parents[1]


def make(runs, name, tag="test", task="toy", status="finished", age_days=0.0):
    run = new_run(runs, task, name, tag, {"train": {"max_steps": 3}}, summary=f"summary of {name}")
    run.update(status=status, step=3, max_steps=3, members=["m"])
    run.release()
    if age_days:
        info = run.info()
        info["updated"] = (datetime.now() - timedelta(days=age_days)).isoformat()
        write_json_atomic(run.dir / "run.json", info)
        RunsIndex(runs).rebuild()
    return run


def rows(runs):
    return json.loads((runs / "index.json").read_text())["runs"]


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_a_trained_run_has_a_full_index_row(runs_dir):
    assert cli_train(runs_dir, "--max-digits", "1", "--max-steps", "2", "--run-name", "r1") == 0
    row = rows(runs_dir)["parallel_comparison/r1"]
    assert row["status"] == "finished" and row["tag"] == "test" and row["step"] == 2 and row["max_steps"] == 2
    assert row["created"] and row["updated"] >= row["created"]
    assert "d_model 32" in row["summary"]
    assert row["logs"] == ["parallel_comparison/r1/simple", "parallel_comparison/r1/latent"]
    for rel in (*row["logs"], row["checkpoints"]):
        assert (runs_dir / rel).is_dir()  # paths are relative to the runs folder


def test_runs_started_at_once_all_land_in_the_index(runs_dir):
    code = ("import sys; from trainlab.engine.tracking import new_run\n"
            "for i in range(5):\n"
            "    r = new_run(sys.argv[1], 'toy', f'p{sys.argv[2]}-{i}', 'test')\n"
            "    r.update(status='finished'); r.release()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(runs_dir), str(p)], env=env) for p in range(6)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    got = rows(runs_dir)
    assert sorted(got) == sorted(f"toy/p{p}-{i}" for p in range(6) for i in range(5))
    assert all(r["status"] == "finished" for r in got.values())


def test_a_damaged_index_is_rebuilt_from_the_run_folders(runs_dir, caplog):
    for name in ("a", "b"):
        make(runs_dir, name)
    (runs_dir / "index.json").write_text('{"runs": {"toy/a": ')  # torn write from some other tool
    with caplog.at_level(logging.WARNING, logger="trainlab"):
        got = RunsIndex(runs_dir).rows()
    assert sorted(got) == ["toy/a", "toy/b"] and got["toy/a"]["summary"] == "summary of a"
    assert "rebuilding" in caplog.text
    assert sorted(rows(runs_dir)) == ["toy/a", "toy/b"]  # and written back


def test_list_shows_runs_and_calls_a_dead_running_run_failed(runs_dir, capsys):
    make(runs_dir, "fine")
    dead = make(runs_dir, "dead")
    dead.update(status="running")  # its process was SIGKILLed: nobody holds the lock
    live = make(runs_dir, "live", status="running")
    live.acquire()
    try:
        code, out, _ = cli(capsys, "runs", "list", "--runs-dir", str(runs_dir))
    finally:
        live.release()
    assert code == 0
    status = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:]}
    assert status == {"fine": "finished", "dead": "failed", "live": "running"}


def test_clean_removes_only_idle_test_runs(runs_dir, capsys):
    keep = make(runs_dir, "mine", tag="")
    make(runs_dir, "t1")
    make(runs_dir, "t2", task="other")
    busy = make(runs_dir, "busy")
    busy.acquire()  # being trained right now
    try:
        code, out, _ = cli(capsys, "runs", "clean", "--tests", "--dry-run", "--runs-dir", str(runs_dir))
        assert code == 0 and "would remove 2 test runs" in out
        assert len(rows(runs_dir)) == 4 and (runs_dir / "toy" / "t1").is_dir()
        code, out, _ = cli(capsys, "runs", "clean", "--tests", "--runs-dir", str(runs_dir))
    finally:
        busy.release()
    assert code == 0 and "removed 2 test runs" in out
    assert sorted(rows(runs_dir)) == ["toy/busy", "toy/mine"]
    assert not (runs_dir / "toy" / "t1").exists() and not (runs_dir / "other" / "t2").exists()
    assert keep.dir.is_dir() and (keep.dir / "run.json").is_file()
    assert not [p for p in (runs_dir / "toy").iterdir() if p.name.startswith(".")]


def test_clean_older_than_keeps_recent_test_runs(runs_dir, capsys):
    make(runs_dir, "old", age_days=9)
    make(runs_dir, "new", age_days=1)
    make(runs_dir, "untagged-old", tag="", age_days=30)
    code, out, _ = cli(capsys, "runs", "clean", "--tests", "--older-than", "7d", "--runs-dir", str(runs_dir))
    assert code == 0 and "removed toy/old" in out
    assert sorted(rows(runs_dir)) == ["toy/new", "toy/untagged-old"]


@pytest.mark.parametrize("argv, needle", [
    (["runs", "clean"], "--tests"),
    (["runs", "clean", "--tests", "--older-than", "soon"], "--older-than"),
    (["runs", "rm", "nope"], "no run 'nope'"),
])
def test_bad_cleanup_requests_are_one_line_errors(runs_dir, capsys, argv, needle):
    make(runs_dir, "x")
    code, _, err = cli(capsys, *argv, "--runs-dir", str(runs_dir))
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert (runs_dir / "toy" / "x").is_dir()


def test_rm_removes_a_run_by_id_whatever_its_tag(runs_dir, capsys):
    make(runs_dir, "mine", tag="")
    make(runs_dir, "other")
    code, out, _ = cli(capsys, "runs", "rm", "toy/mine", "--runs-dir", str(runs_dir))
    assert code == 0 and "removed toy/mine" in out
    assert sorted(rows(runs_dir)) == ["toy/other"] and not (runs_dir / "toy" / "mine").exists()
    code, _, _ = cli(capsys, "runs", "rm", "other", "--runs-dir", str(runs_dir))
    assert code == 0 and rows(runs_dir) == {}


def test_rm_refuses_what_resolves_outside_the_runs_folder_and_runs_in_use(runs_dir, tmp_path, capsys):
    outside = make(tmp_path / "elsewhere", "precious", tag="")
    make(runs_dir, "x")
    (runs_dir / "toy" / "link").symlink_to(outside.dir)
    for ref in (str(outside.dir), "link", "toy/link", "../elsewhere/toy/precious"):
        code, _, err = cli(capsys, "runs", "rm", ref, "--runs-dir", str(runs_dir))
        assert code == 2 and len(err.splitlines()) == 1, (ref, err)
    assert (outside.dir / "run.json").is_file()
    busy = Run("x", "toy", runs_dir / "toy" / "x")
    busy.acquire()
    try:
        code, _, err = cli(capsys, "runs", "rm", "x", "--runs-dir", str(runs_dir))
    finally:
        busy.release()
    assert code == 2 and "in use" in err and (runs_dir / "toy" / "x").is_dir()


def test_an_id_in_two_tasks_must_be_written_task_slash_id(runs_dir, capsys):
    make(runs_dir, "same", task="toy")
    make(runs_dir, "same", task="other")
    code, _, err = cli(capsys, "runs", "rm", "same", "--runs-dir", str(runs_dir))
    assert code == 2 and "task/id" in err
    assert find_run(runs_dir, None, "other/same").task == "other"


@pytest.mark.parametrize("task", ["multiply", "chat"])
def test_every_shipped_preset_passes_every_check_of_its_task(task):
    """A preset is read only when a user names it: a bad value in one would be that user's
    first error. Each one's settings build every section (every __post_init__ check)."""
    from trainlab import runs
    from trainlab.config import build, preset_names

    names = preset_names(task)
    assert names
    sections = runs.multiply_sections() if task == "multiply" else runs.chat_sections()
    for name in names:
        values = runs.settings(task, name, flags={"text": "corpus.txt"} if task == "chat" else {})
        for _, cls in sections:
            build(cls, values)
