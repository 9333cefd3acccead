"""``trainlab tune multiply|chat`` and ``trainlab tune show``: hyperparameter search on Optuna
(``trainlab/tune.py`` says how a study and its trials work)."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from trainlab.cli.common import EXIT_FAILED, Parser, settings_from, train_flags, without_budget
from trainlab.config import ConfigError, UsageError
from trainlab.runs import chat_sections, checked_task, known_settings, multiply_sections, task_kind

TUNE_KEYS = ("space", "trials", "budget_steps", "budget_minutes", "study", "storage", "pruner", "objective", "workers",
             "worker_index", "argv", "enqueue")


def add_parser(sub) -> None:
    tune = sub.add_parser("tune", help="search training settings with Optuna (each trial an ordinary run)")
    tsub = tune.add_subparsers(dest="command", required=True, parser_class=Parser)
    for task, sections in (("multiply", multiply_sections()), ("chat", chat_sections())):
        p = tsub.add_parser(task, help=f"a study of `trainlab {task} train` settings")
        p.add_argument("--space", required=True, metavar="FILE|NAME",
                       help="search space: a YAML file (one entry per train flag) or a shipped one by name")
        p.add_argument("--trials", type=int, required=True, help="finished (or pruned) trials the study holds at the end")
        budget = p.add_mutually_exclusive_group(required=True)
        budget.add_argument("--budget-steps", type=int, help="optimizer steps of every trial")
        budget.add_argument("--budget-minutes", type=float, help="training minutes of every trial (its step count "
                                                                "is fitted from a short timing)")
        p.add_argument("--study", help="study name (default: TASK-SPACE); the same command again continues it")
        p.add_argument("--storage", help="an Optuna storage URL: sqlite:///FILE, postgresql://..., or journal:FILE "
                                         "(default: sqlite under RUNS_DIR/tune/STUDY/)")
        p.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                       help="stop unpromising trials at their evaluations")
        p.add_argument("--objective", help="the evaluation metric to optimise (default: multiply exact_match_DxD "
                                           "for D = --max-digits, chat val_loss)")
        p.add_argument("--workers", type=int, default=1, help="local worker processes on this study")
        p.add_argument("--enqueue", metavar="FILE", help="a config file (another study's best.yaml, say) whose "
                                                         "searched values the study tries first; again only if no "
                                                         "trial has tried them")
        p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
        train_flags(p, task, sections, resume=False)
    show = tsub.add_parser("show", help="the best trial, every trial, importances; writes best.yaml and plots")
    show.add_argument("study", help="study name")
    show.add_argument("--storage", help="its storage URL, if not the default one")
    show.add_argument("--runs-dir", default="runs", help="root folder of all runs")


def plan_from(args: argparse.Namespace):
    """The study plan from the command line, every input checked; nothing is written."""
    from trainlab.engine.tracking import check_runs_dir
    from trainlab.tune import STUDY_NAME, StudyPlan, default_objective, direction_of, enqueued_params, parse_space, \
        plain, read_space, storage_url

    kind = task_kind(args.command)
    sections = kind.sections()
    values = without_budget(args, settings_from(args, args.command), "a study's trials take --budget-minutes")
    base = known_settings(args.command, values)
    if args.trials < 1:
        raise ConfigError("trials", f"must be at least 1, got {args.trials}")
    if args.workers < 1:
        raise ConfigError("workers", f"must be at least 1, got {args.workers}")
    if args.budget_steps is not None and args.budget_steps < 1:
        raise ConfigError("budget_steps", f"must be positive, got {args.budget_steps}")
    if args.budget_minutes is not None and not (math.isfinite(args.budget_minutes) and args.budget_minutes > 0):
        raise ConfigError("budget_minutes", f"must be a positive number, got {args.budget_minutes}")
    space_name, data = read_space(args.space, args.command)
    study = args.study or f"{args.command}-{space_name}"
    if not STUDY_NAME.fullmatch(study):
        raise ConfigError("study", f"{study!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")
    dims = parse_space(data, sections, base, f"space {args.space}")
    enqueue = enqueued_params(args.enqueue, dims) if args.enqueue else None
    # the settings every trial starts from must themselves be good (corpus, device, ...)
    checked_task(kind, {**base, "max_steps": args.budget_steps or 1})
    objective, direction = (args.objective, direction_of(args.objective)) if args.objective \
        else default_objective(args.command, base)
    runs_dir = Path(base.get("runs_dir", "runs"))
    check_runs_dir(runs_dir)
    folder = runs_dir / "tune" / study
    seed = values.get("seed") if "seed" in vars(args) else None
    return StudyPlan(study, args.command, storage_url(args.storage, folder), folder, dims, base, args.trials,
                     args.budget_steps, args.budget_minutes, objective, direction, args.pruner, seed,
                     attrs={"trainlab_base": json.dumps(plain(base)),
                            "trainlab_budget": f"{args.budget_steps} steps" if args.budget_steps
                            else f"{args.budget_minutes} minutes"}, enqueue=enqueue), kind


def tune_run(args: argparse.Namespace) -> int:
    from trainlab.tune import TrialInterrupted, create_or_load, enqueue_first, existing_study, work

    plan, kind = plan_from(args)
    study = existing_study(plan)  # refuses a study of another task or space, writing nothing
    if args.worker_index == 0:
        verb = "continuing" if study is not None else "new"
        budget = f"{plan.budget_steps} steps" if plan.budget_steps else f"{plan.budget_minutes:g} minutes"
        print(f"study {plan.name} ({verb}): {plan.trials} trials of {budget}, {plan.objective} "
              f"({plan.direction}), pruner {plan.pruner}; storage {plan.storage}")
    made = create_or_load(plan)  # made once here, before any worker races to make it
    if plan.enqueue and args.worker_index == 0 and enqueue_first(made, plan.enqueue):
        print(f"enqueued first: the searched values of {args.enqueue}")
    try:
        if args.workers > 1:
            return _spawn_workers(args)
        counts = work(plan, kind, args.worker_index, say=lambda line: print(line, flush=True))
    except TrialInterrupted:
        print(f"stopped: the trial in progress is marked failed, finished trials are kept; run the same "
              f"command again to continue study {plan.name}")
        return 130
    if args.worker_index == 0:
        print(f"study {plan.name}: {', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))}; "
              f"see `trainlab tune show {plan.name}" + (f" --runs-dir {plan.base['runs_dir']}`"
                                                        if plan.base.get("runs_dir", "runs") != "runs" else "`"))
    return 0


def _spawn_workers(args: argparse.Namespace) -> int:
    """``--workers N``: N processes of this same command, each with its share of the cores."""
    argv = list(args.argv)
    i = argv.index("--workers") if "--workers" in argv else None
    if i is not None:
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--workers=")]
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    procs = [subprocess.Popen([sys.executable, "-m", "trainlab", *argv, "--worker-index", str(k)], env=env)
             for k in range(args.workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got the same Ctrl+C from the terminal; let them save and stop
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait() for p in procs]
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"{len(bad)} of {args.workers} workers ended with an error (exit {bad[0]})")
        return bad[0] if bad[0] in (130, 143) else EXIT_FAILED
    print(f"all {args.workers} workers done")
    return 0


def tune_show(args: argparse.Namespace) -> int:
    import optuna
    import yaml

    from trainlab.tune import STUDY_NAME, best_settings, counts, importances, open_storage, save_plots, \
        storage_exists, storage_url

    if not STUDY_NAME.fullmatch(args.study):
        raise UsageError(f"no study {args.study!r}")
    folder = Path(args.runs_dir) / "tune" / args.study
    url = storage_url(args.storage, folder)
    if not storage_exists(url):
        raise UsageError(f"no study {args.study!r} (looked in {url}; pass --storage if it lives elsewhere)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=open_storage(url))
    except KeyError:
        raise UsageError(f"no study {args.study!r} in {url}") from None
    task = study.user_attrs.get("trainlab_task", "?")
    print(f"study {args.study}: task {task}, {study.user_attrs.get('trainlab_objective')} "
          f"({study.direction.name.lower()}), budget {study.user_attrs.get('trainlab_budget', '?')}")
    c = counts(study)
    print("trials: " + (", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items())) or "none"))
    trials = study.get_trials(deepcopy=False)
    print(f"\n{'#':>4} {'state':9s} {'value':>9s} {'seconds':>8s}  run  params")
    for t in trials:
        secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else float("nan")
        value = f"{t.value:.4g}" if t.value is not None else "-"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        print(f"{t.number:>4} {t.state.name.lower():9s} {value:>9s} {secs:>8.0f}  {t.user_attrs.get('run', '-')}  {params}")
    try:
        best = study.best_trial
    except ValueError:
        print("\nno finished trial yet: nothing to call best")
        return 0
    print(f"\nbest: trial {best.number}, {study.user_attrs.get('trainlab_objective')} {best.value:.4g}, "
          f"run {best.user_attrs.get('run', '-')}")
    sections = task_kind(task).sections() if task in ("multiply", "chat") else []
    settings = best_settings(study, sections)
    for k, v in settings.items():
        print(f"  {k}: {v}")
    imp = importances(study)
    if imp:
        print("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    else:
        print("parameter importances: need at least 2 finished trials")
    folder.mkdir(parents=True, exist_ok=True)
    best_yaml = folder / "best.yaml"
    best_yaml.write_text(f"# the best trial ({best.number}) of study {args.study}: "
                         f"trainlab {task} train --config {best_yaml}\n" + yaml.safe_dump(settings, sort_keys=True),
                         encoding="utf-8")
    print(f"wrote {best_yaml}" + "".join(f", {p}" for p in save_plots(study, folder)))
    return 0


COMMANDS = {("tune", "multiply"): tune_run, ("tune", "chat"): tune_run, ("tune", "show"): tune_show}
