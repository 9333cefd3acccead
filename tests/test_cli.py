import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import register_runs_dir
from helpers import TINY

from trainlab.cli import main

ROOT = Path(__file__).resolve().parents[1]



def test_classic_command_in_a_tiny_form(tmp_path):
    runs = register_runs_dir(tmp_path / "runs")
    cmd = [sys.executable, str(ROOT / "main.py"), "--d-model", "64", "--num-layers", "2", "--num-latent", "4",
           "--min-digits", "1", "--max-digits", "1", "--batch-size", "16", "--max-steps", "20", "--save-every", "10",
           "--runs-dir", str(runs), "--no-progress", "--tag", "test"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (run,) = (runs / "parallel_comparison").iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step_0000010", "step_0000020"]
    assert list((run / "simple").glob("events.out.tfevents.*")) and list((run / "latent").glob("events.out.tfevents.*"))
    report = (run / "report.md").read_text()
    assert "simple" in report and "latent" in report and "parameters" in report
    assert (run / "val_exact_match.png").stat().st_size > 1000
    assert "simple:" in out.stdout and "parameters" in out.stdout


def one_line_error(capsys, argv):
    code = None
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("flags, needle", [
    (["--min-digits", "3", "--max-digits", "2"], "--min-digits"),
    (["--max-digits", "12"], "--max-digits"),
    (["--min-digits", "0"], "--min-digits"),
    (["--batch-size", "0"], "--batch-size"),
    (["--d-model", "-4"], "--d-model"),
    (["--d-model", "30", "--nhead", "4"], "--d-model"),
    (["--tf-schedule", "sigmoid"], "--tf-schedule"),
    (["--answer-order", "sideways"], "--answer-order"),
    (["--members", "simple,huge"], "--members"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--device", "tpu"], "--device"),
    (["--no-such-flag"], "unrecognized"),
    (["--lr", "fast"], "--lr"),
    (["--run-name", "../escape"], "--run-name"),
    (["--preset", "nope"], "--preset"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--muon-momentum", "1"], "--muon-momentum"),
    (["--class-power", "2"], "--class-power"),
    (["--ema", "1"], "--ema"),
    (["--ema", "-0.5"], "--ema"),
])
def test_bad_flags_get_one_line_and_exit_2_and_write_nothing(tmp_path, capsys, flags, needle):
    runs = register_runs_dir(tmp_path / "runs")
    code, err = one_line_error(capsys, ["multiply", "train", "--runs-dir", str(runs), *TINY, *flags])
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err
    assert not runs.exists()


@pytest.mark.parametrize("command", ["multiply train", "multiply ask", "multiply evaluate", "chat train",
                                     "chat generate", "chat repl", "runs"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as stop:
        main([*command.split(), "--help"])
    code, out = stop.value.code, capsys.readouterr().out
    assert code == 0 and out.startswith("usage:"), out
    if command.endswith("train"):
        assert "--optimizer" in out and "--compile" in out


def test_bad_config_files(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("d_model: [1, 2\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("d_modle: 64\n")
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("d_model: sixty-four\n")
    for path, needle in [(bad_yaml, "YAML"), (unknown, "d_modle"), (wrong_type, "--d-model"),
                         (tmp_path / "missing.yaml", "cannot read")]:
        code, err = one_line_error(capsys, ["multiply", "train", "--runs-dir", str(tmp_path / "r"), "--config", str(path)])
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r").exists()


def test_flags_override_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("d_model: 48\nmax_steps: 2\nmin_digits: 1\nmax_digits: 1\n")
    runs = register_runs_dir(tmp_path / "runs")
    assert main(["multiply", "train", "--config", str(cfg), "--runs-dir", str(runs), *TINY, "--run-name", "x"]) == 0
    ck = runs / "parallel_comparison" / "x" / "checkpoints" / "step_0000002"
    assert json.loads((ck / "simple" / "model_config.json").read_text())["d_model"] == 32  # the flag won
    assert json.loads((ck / "config.json").read_text())["train"]["max_steps"] == 2  # the file's value stayed


def test_existing_run_name_is_never_overwritten(tmp_path, capsys):
    runs = register_runs_dir(tmp_path / "runs")
    args = ["multiply", "train", "--runs-dir", str(runs), *TINY, "--max-steps", "1", "--max-digits", "1",
            "--run-name", "keep"]
    assert main(args) == 0
    marker = runs / "parallel_comparison" / "keep" / "report.md"
    before = marker.read_text()
    code, err = one_line_error(capsys, args)
    assert code == 2 and "already exists" in err
    assert marker.read_text() == before


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    runs = register_runs_dir(tmp_path_factory.mktemp("runs"))
    assert main(["multiply", "train", "--runs-dir", str(runs), *TINY, "--max-digits", "2", "--max-steps", "3",
                 "--run-name", "r"]) == 0
    return runs


def test_ask_prints_each_models_answer_and_verdict(trained_run, capsys):
    assert main(["multiply", "ask", "r", "12*34", "--runs-dir", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "12*34 = 408" in out
    for name in ("simple", "latent"):
        line = next(l for l in out.splitlines() if l.strip().startswith(name))
        assert line.rstrip().endswith(("right", "wrong"))


def test_ask_accepts_a_checkpoint_folder(trained_run, capsys):
    ck = trained_run / "parallel_comparison" / "r" / "checkpoints" / "step_0000003"
    assert main(["multiply", "ask", str(ck), "7*8"]) == 0
    assert "7*8 = 56" in capsys.readouterr().out


def test_evaluate_reports_exact_match_with_a_confidence_interval(trained_run, capsys):
    assert main(["multiply", "evaluate", "r", "--runs-dir", str(trained_run), "--n", "50", "--split", "test",
                 "--min-digits", "2"]) == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and out.count("exact-match") == 2


@pytest.mark.parametrize("argv, needle", [
    (["multiply", "ask", "r", "12+34"], "problem"),
    (["multiply", "ask", "r", "123*4"], "between 1 and 99"),
    (["multiply", "ask", "nope", "1*2"], "no run"),
    (["multiply", "evaluate", "r", "--max-digits", "3"], "--max-digits"),
    (["multiply", "evaluate", "r", "--split", "holdout"], "--split"),
])
def test_bad_input_to_ask_and_evaluate(trained_run, capsys, argv, needle):
    code, err = one_line_error(capsys, [*argv, "--runs-dir", str(trained_run)])
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_corrupt_checkpoint_is_reported_not_loaded(trained_run, capsys, tmp_path):
    import shutil
    src = trained_run / "parallel_comparison" / "r" / "checkpoints" / "step_0000003"
    ck = tmp_path / "step_0000003"
    shutil.copytree(src, ck)
    (ck / "simple" / "model.pt").write_bytes(b"garbage")
    code, err = one_line_error(capsys, ["multiply", "ask", str(ck), "1*2"])
    assert code == 2 and "checksum" in err


def test_ask_and_evaluate_can_use_the_best_checkpoint(trained_run, capsys):
    best = trained_run / "parallel_comparison" / "r" / "checkpoints" / "best"
    (kept,) = [p for p in best.iterdir() if p.name.startswith("step_")]
    assert main(["multiply", "ask", "r", "7*8", "--best", "--runs-dir", str(trained_run)]) == 0
    assert f"checkpoint step {int(kept.name[5:])}" in capsys.readouterr().out
    code, err = one_line_error(capsys, ["multiply", "ask", str(kept), "7*8", "--best"])
    assert code == 2 and "--best" in err


def test_padded_answers_are_recorded_and_read_back(tmp_path, capsys):
    import torch

    from trainlab.engine.checkpoint import latest_checkpoint
    from trainlab.multiply.evaluation import decode_problems
    from trainlab.multiply.inference import evaluation_dataset, load_members, trained_data_config

    runs = register_runs_dir(tmp_path / "runs")
    assert main(["multiply", "train", "--runs-dir", str(runs), *TINY, "--max-digits", "2", "--max-steps", "2",
                 "--answer-pad", "--run-name", "p"]) == 0
    ck = latest_checkpoint(runs / "parallel_comparison" / "p" / "checkpoints")
    assert ck.json("vocab.json")["answer_pad"] is True
    trained = trained_data_config(ck)
    assert trained.answer_pad
    ds = evaluation_dataset(trained, 1, 2)
    models = load_members(ck, torch.device("cpu"))
    result = decode_problems(models["simple"], ds, ds.subset("test", 20))
    assert result.digit_total == 4 * 20  # every answer compared at its written width, 2 * 2 digits
    capsys.readouterr()
    assert main(["multiply", "ask", "p", "7*8", "--runs-dir", str(runs)]) == 0
    assert "7*8 = 56" in capsys.readouterr().out
