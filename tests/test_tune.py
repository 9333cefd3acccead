"""`trainlab tune`: studies of ordinary runs on Optuna, resumable, multi-process, and strict
about their inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import made_up_text

from trainlab.cli import main
from trainlab.engine import faults

SPACE = {"lr": {"low": 0.001, "high": 0.01, "log": True}, "batch_size": {"choices": [8, 16]}}
MULTIPLY = ["--max-digits", "1", "--eval-every", "2", "--save-every", "1000", "--log-every", "2",
            "--d-model", "32", "--num-layers", "1", "--num-latent", "2", "--eval-samples", "20",
            "--no-progress", "--tag", "test", "--device", "cpu", "--seed", "3"]


def space_file(tmp_path, space=SPACE, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space))
    return path


def tune(runs_dir, task, *flags) -> int:
    return main(["tune", task, "--runs-dir", str(runs_dir), *flags])


def load(runs_dir, name):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / 'tune' / name / 'study.db'}")


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_a_tiny_multiply_study_trains_ordinary_runs_and_shows_its_best(runs_dir, tmp_path, capsys):
    space = space_file(tmp_path)
    assert tune(runs_dir, "multiply", "--space", str(space), "--trials", "3", "--budget-steps", "4",
                "--study", "m", "--pruner", "none", *MULTIPLY) == 0
    study = load(runs_dir, "m")
    assert states(study) == ["COMPLETE"] * 3
    assert study.user_attrs["trainlab_objective"] == "exact_match_1x1"
    index = json.loads((runs_dir / "index.json").read_text())["runs"]
    for t in study.trials:
        key = t.user_attrs["run"]
        assert key in index and index[key]["tag"] == "test" and index[key]["status"] == "finished"
        info = json.loads((runs_dir / key / "run.json").read_text())
        assert info["study"] == "m" and info["trial"] == t.number and info["step"] == 4
        assert (runs_dir / key / "simple").is_dir()  # TensorBoard events, as for any run
        assert info["config"]["train"]["lr"] == pytest.approx(t.params["lr"])
    capsys.readouterr()
    assert main(["tune", "show", "m", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert f"best: trial {study.best_trial.number}" in out and "3 complete" in out
    assert "parameter importances:" in out
    folder = runs_dir / "tune" / "m"
    assert (folder / "history.png").stat().st_size > 1000
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["max_steps"] == 4 and best["lr"] == pytest.approx(study.best_params["lr"])
    # best.yaml trains as a config file
    capsys.readouterr()
    assert main(["multiply", "train", "--config", str(folder / "best.yaml"), "--runs-dir", str(runs_dir),
                 "--run-name", "from-best", "--no-progress", "--tag", "test", "--max-steps", "2"]) == 0
    trained = json.loads((runs_dir / "parallel_comparison" / "from-best" / "run.json").read_text())["config"]
    assert trained["train"]["batch_size"] == study.best_params["batch_size"]



def test_best_yaml_keeps_a_searched_value_that_equals_the_default(runs_dir, tmp_path, capsys):
    """The study's flags turn --answer-pad on and the space can only turn it off: best.yaml
    must say `answer_pad: false`, or laid over the study's settings (compare --preset P
    --recipe-simple best.yaml) it would train the preset's value instead of the best trial's."""
    space = space_file(tmp_path, {"answer_pad": {"choices": [False]}, "lr": {"low": 0.001, "high": 0.002}})
    assert tune(runs_dir, "multiply", "--space", str(space), "--trials", "1", "--budget-steps", "2",
                "--study", "pad", "--pruner", "none", "--answer-pad", *MULTIPLY) == 0
    assert main(["tune", "show", "pad", "--runs-dir", str(runs_dir)]) == 0
    best = yaml.safe_load((runs_dir / "tune" / "pad" / "best.yaml").read_text())
    assert best["answer_pad"] is False and best["max_steps"] == 2 and best["max_digits"] == 1

def trial_evals(runs_dir, trial, member: str) -> list[dict[str, float]]:
    """The evaluations saved in the trial's run, from its newest checkpoint."""
    from trainlab.engine.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(runs_dir / trial.user_attrs["run"] / "checkpoints")
    return ckpt.tensors(f"{member}/train_state.pt")["evals"]


def test_a_budget_in_minutes_fits_each_trials_steps_from_its_step_time(runs_dir, tmp_path, monkeypatch):
    """The step count of a trial is its minutes over its measured seconds per step: with the
    timing pinned to 0.5 s a step, 0.1 minutes are 12 steps, trained to the last one with
    the LR schedule ending there."""
    from trainlab.engine import step as engine_step

    timed = []

    def pinned(task, cfg, *args, **kwargs):
        timed.append(cfg.batch_size)
        return 0.5, cfg.precision, {cfg.precision: 0.5}

    monkeypatch.setattr(engine_step, "fitted_seconds_per_step", pinned)
    space = space_file(tmp_path)
    assert tune(runs_dir, "multiply", "--space", str(space), "--trials", "2", "--budget-minutes", "0.1",
                "--study", "mins", "--pruner", "none", *MULTIPLY) == 0
    study = load(runs_dir, "mins")
    assert states(study) == ["COMPLETE"] * 2 and len(timed) == 2  # each trial timed with its own settings
    assert study.user_attrs["trainlab_budget"] == "0.1 minutes"
    for t in study.trials:
        assert t.user_attrs["max_steps"] == 12
        info = json.loads((runs_dir / t.user_attrs["run"] / "run.json").read_text())
        assert info["step"] == 12 and info["status"] == "finished"
        assert info["config"]["train"]["max_steps"] == info["config"]["train"]["lr_decay_steps"] == 12
        best = max(e["exact_match_1x1"] for m in ("simple", "latent") for e in trial_evals(runs_dir, t, m))
        assert t.value == best


def test_a_tiny_chat_study_with_the_shipped_space(runs_dir, tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    space = space_file(tmp_path, {"lr": {"low": 0.001, "high": 0.01, "log": True}, "num_layers": [1, 2]})
    assert tune(runs_dir, "chat", "--space", str(space), "--trials", "3", "--budget-steps", "3", "--study", "c",
                "--text", str(corpus), "--preset", "chatgot-tiny", "--eval-every", "3", "--no-progress",
                "--tag", "test", "--device", "cpu", "--sample-every", "0") == 0
    study = load(runs_dir, "c")
    assert states(study) == ["COMPLETE"] * 3 and study.direction.name == "MINIMIZE"
    assert all(0 < t.value < 10 for t in study.trials)  # val losses
    # each trial's value is the best (lowest) val loss among its own run's evaluations
    for t in study.trials:
        evals = trial_evals(runs_dir, t, "gpt")
        assert evals and t.value == pytest.approx(min(e["val_loss"] for e in evals), rel=1e-12)
    assert len({round(t.value, 9) for t in study.trials}) == 3  # different settings, different scores
    # the shipped spaces pass their own checks against the presets they are meant for (in fp32
    # and one evaluation batch: the presets' models are large, and this is about the spaces,
    # not precision, which on a CPU without native bf16 would make the bf16 pass emulate them)
    for space, preset in (("default", "fast-cpu"), ("budget", "chat-20min")):
        assert tune(runs_dir, "chat", "--space", space, "--trials", "1", "--budget-steps", "1", "--study", space,
                    "--text", str(corpus), "--preset", preset, "--no-progress", "--tag", "test", "--device", "cpu",
                    "--sample-every", "0", "--eval-every", "1", "--eval-batches", "1", "--precision", "fp32") == 0



@pytest.mark.parametrize("member", ["simple", "latent"])
def test_the_shipped_3digit_space_holds_the_options_and_latents_settings(runs_dir, member):
    """Issue 27's equal footing: one space for both members, every edge accepted by the
    3-digit preset, and a trial draws the options into an ordinary run's config."""

    from trainlab.tune import read_space

    _, space = read_space("3digit", "multiply")
    assert {"abacus", "carry_loss", "answer_order", "num_latent", "latent_layers", "bottleneck_factor"} <= set(space)
    assert tune(runs_dir, "multiply", "--space", "3digit", "--trials", "2", "--budget-steps", "1", "--study", member,
                "--preset", "multiply-3digit", "--members", member, "--pruner", "none", "--eval-every", "1",
                "--save-every", "1000", "--eval-samples", "20", "--test-n", "20", "--no-progress", "--tag", "test",
                "--device", "cpu", "--seed", "0", "--precision", "fp32") == 0  # the space's plumbing, not precision
    study = load(runs_dir, member)
    assert states(study) == ["COMPLETE"] * 2
    for t in study.trials:
        model = json.loads((runs_dir / t.user_attrs["run"] / "run.json").read_text())["config"]["model"]
        assert model["abacus"] == t.params["abacus"] and model["carry_loss"] == t.params["carry_loss"]
        assert model["num_latent"] == t.params["num_latent"]

def test_pruning_stops_unpromising_trials_at_an_evaluation(runs_dir, tmp_path, monkeypatch):
    """The median pruner against trials whose objective is 0 at every evaluation after 3
    better ones: a trial reports, is pruned, and its run ends saved with status pruned."""
    import optuna

    from trainlab import tune as tune_module

    space = space_file(tmp_path)
    current, real_run = {}, tune_module.run_trial

    def run_trial(plan, study, trial, kind, say):
        current["n"] = trial.number
        return real_run(plan, study, trial, kind, say)

    monkeypatch.setattr(tune_module, "run_trial", run_trial)
    monkeypatch.setattr(tune_module, "score", lambda per, d: 0.9 if current["n"] < 3 else 0.0)
    assert tune(runs_dir, "multiply", "--space", str(space), "--trials", "5", "--budget-steps", "6", "--study", "p",
                *MULTIPLY) == 0
    study = load(runs_dir, "p")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, states(study)
    info = json.loads((runs_dir / pruned[0].user_attrs["run"] / "run.json").read_text())
    assert info["status"] == "pruned" and info["step"] < 6


def test_a_killed_study_resumes_with_an_exact_count(runs_dir, tmp_path):
    """One trial finishes, the worker is killed in the middle of the next, and the same
    command run again marks that one failed and finishes the study: exactly 3 finished
    trials, the first one kept as it was."""
    space = space_file(tmp_path)
    cmd = [sys.executable, "-m", "trainlab", "tune", "multiply", "--runs-dir", str(runs_dir), "--space", str(space),
           "--budget-steps", "4", "--study", "k", "--pruner", "none", *MULTIPLY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    assert subprocess.run([*cmd, "--trials", "1"], env=env, capture_output=True, timeout=300).returncode == 0
    first = load(runs_dir, "k").trials[0]
    killed = subprocess.run([*cmd, "--trials", "3"], env={**env, faults.ENV: "kill=2"}, capture_output=True,
                            timeout=300)
    assert killed.returncode == -9
    assert states(load(runs_dir, "k")) == ["COMPLETE", "RUNNING"]
    again = subprocess.run([*cmd, "--trials", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "left running by a worker that died" in again.stdout
    study = load(runs_dir, "k")
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[0].value == first.value and study.trials[0].params == first.params
    # the seeded sampler moves on when the study continues: no replay of the first suggestions
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 4


def test_two_workers_share_one_study_without_losing_or_doubling_a_trial(runs_dir, tmp_path):
    space = space_file(tmp_path)
    p = subprocess.run([sys.executable, "-m", "trainlab", "tune", "multiply", "--runs-dir", str(runs_dir),
                        "--space", str(space), "--trials", "4", "--budget-steps", "4", "--study", "w",
                        "--pruner", "none", "--workers", "2", *MULTIPLY],
                       env={**os.environ, faults.ENV: ""}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    study = load(runs_dir, "w")
    assert states(study) == ["COMPLETE"] * 4
    runs = [t.user_attrs["run"] for t in study.trials]
    assert len(set(runs)) == 4 and sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    workers = {json.loads((runs_dir / r / "run.json").read_text())["pid"] for r in runs}
    assert len(workers) == 2  # both processes trained


@pytest.mark.parametrize("space, says", [
    ("not: [a, mapping", "not valid YAML"),
    ({"no_such_flag": [1, 2]}, "not a flag"),
    ({"lr": {"low": 0.01, "high": 0.01}}, "empty"),
    ({"lr": {"low": 0.1, "high": 0.01}}, "inverted"),
    ({"lr": {"low": 0.0, "high": 0.01, "log": True}}, "above 0"),
    ({"dropout": [0.1, 1.5]}, "fails the flag's own check"),
    ({"optimizer": ["adamw", "sgd"]}, "fails the flag's own check"),
    ({"d_model": {"low": 16.5, "high": 64}}, "whole number"),
    ({"runs_dir": ["a", "b"]}, "cannot be searched"),
    ({"lr": {"low": 0.001, "high": 0.01, "log": "yes"}}, "log must be"),
    ({}, "at least one entry"),
])
def test_bad_spaces_are_one_line_and_write_nothing(runs_dir, tmp_path, capsys, space, says):
    path = tmp_path / "bad.yaml"
    path.write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    assert tune(runs_dir, "multiply", "--space", str(path), "--trials", "2", "--budget-steps", "2", *MULTIPLY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not runs_dir.exists()


def test_a_study_of_another_task_or_space_is_refused(runs_dir, tmp_path, capsys):
    space = space_file(tmp_path)
    assert tune(runs_dir, "multiply", "--space", str(space), "--trials", "1", "--budget-steps", "2", "--study", "s",
                "--pruner", "none", *MULTIPLY) == 0
    other = space_file(tmp_path, {"lr": {"low": 0.002, "high": 0.01}}, "other.yaml")
    capsys.readouterr()
    assert tune(runs_dir, "multiply", "--space", str(other), "--trials", "2", "--budget-steps", "2", "--study", "s",
                *MULTIPLY) == 2
    assert "another search space" in capsys.readouterr().err
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    assert tune(runs_dir, "chat", "--space", str(space), "--trials", "2", "--budget-steps", "2", "--study", "s",
                "--text", str(corpus), "--preset", "chatgot-tiny", "--tag", "test", "--device", "cpu") == 2
    assert "exists for task 'multiply'" in capsys.readouterr().err
    assert len(load(runs_dir, "s").trials) == 1


@pytest.mark.parametrize("flags, says", [
    (["--trials", "0", "--budget-steps", "2"], "--trials"),
    (["--trials", "2", "--budget-steps", "0"], "--budget-steps"),
    (["--trials", "2", "--budget-minutes", "nan"], "--budget-minutes"),
    (["--trials", "2", "--budget-steps", "2", "--study", "../x"], "--study"),
    (["--trials", "2", "--budget-steps", "2", "--space", "nowhere"], "no file"),
])
def test_bad_tune_flags_are_one_line(runs_dir, tmp_path, capsys, flags, says):
    space = space_file(tmp_path)
    assert tune(runs_dir, "multiply", "--space", str(space), *flags, *MULTIPLY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not runs_dir.exists()
    assert main(["tune", "show", "nothing", "--runs-dir", str(runs_dir)]) == 2


def test_helpers_of_the_objective():
    from trainlab.tune import best_value, default_objective, direction_of, score

    assert default_objective("multiply", {"max_digits": 3}) == ("exact_match_3x3", "maximize")
    assert default_objective("chat", {}) == ("val_loss", "minimize")
    assert direction_of("val_loss") == "minimize" and direction_of("exact_match") == "maximize"
    evals = [{"step": 2, "m": 0.5}, {"step": 4, "m": 0.8}, {"step": 6, "m": 0.7}, {"step": 8}]
    assert best_value(evals, "m", "maximize") == 0.8 and best_value(evals, "m", "minimize") == 0.5
    assert score({"simple": 0.8, "latent": 0.6}, "maximize") == 0.8
    assert score({"simple": float("nan"), "latent": 0.6}, "minimize") == 0.6


def test_enqueue_makes_a_recipe_the_first_trial_once(runs_dir, tmp_path, capsys):
    """--enqueue FILE: the searched values of a config file (a best.yaml) are trial 0; keys the
    space does not search are ignored; a continued study does not try them again."""
    space = space_file(tmp_path)
    recipe = tmp_path / "best.yaml"
    recipe.write_text(yaml.safe_dump({"lr": 0.0042, "batch_size": 16, "d_model": 999, "max_steps": 77}))
    flags = ["--space", str(space), "--budget-steps", "2", "--study", "q", "--pruner", "none",
             "--enqueue", str(recipe), *MULTIPLY]
    assert tune(runs_dir, "multiply", "--trials", "2", *flags) == 0
    assert "enqueued first" in capsys.readouterr().out
    study = load(runs_dir, "q")
    assert states(study) == ["COMPLETE"] * 2
    assert study.trials[0].params == {"lr": 0.0042, "batch_size": 16}
    assert study.trials[1].params != study.trials[0].params
    info = json.loads((runs_dir / study.trials[0].user_attrs["run"] / "run.json").read_text())
    assert info["config"]["model"]["d_model"] == 32  # not searched: the study's own value
    assert tune(runs_dir, "multiply", "--trials", "3", *flags) == 0
    assert "enqueued first" not in capsys.readouterr().out
    study = load(runs_dir, "q")
    assert len(study.trials) == 3
    assert sum(t.params == {"lr": 0.0042, "batch_size": 16} for t in study.trials) == 1


@pytest.mark.parametrize("recipe, says", [
    ({"lr": 0.005}, "no value for batch_size"),
    ({"lr": 0.5, "batch_size": 16}, "lr: 0.5 is outside the space"),
    ({"lr": 0.005, "batch_size": 12}, "batch_size: 12 is outside the space"),
    ({"lr": "fast", "batch_size": 16}, "lr: 'fast' is outside the space"),
    ("- a list", "must hold a mapping"),
    (None, "best.yaml"),  # no such file
])
def test_a_bad_enqueue_file_is_one_line_and_writes_nothing(runs_dir, tmp_path, capsys, recipe, says):
    path = tmp_path / "best.yaml"
    if recipe is not None:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    assert tune(runs_dir, "multiply", "--space", str(space_file(tmp_path)), "--trials", "2", "--budget-steps", "2",
                "--enqueue", str(path), *MULTIPLY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not runs_dir.exists()
