"""Hyperparameter search on Optuna: every trial is an ordinary run of the training loop.

Why Optuna and not a loop of our own: it brings the samplers (TPE), the pruners (median,
Hyperband), storage that outlives a process (SQLite by default; any SQLAlchemy URL, or its
journal file, for many processes and machines), parameter importances and plots, all
well kept. What trainlab adds is what makes a trial trustworthy: it is a normal run (runs
index, TensorBoard, checkpoints, resume), scored on the task's own evaluation.

The space file (YAML) has one entry per train flag, by its config name:

    lr: {low: 0.001, high: 0.02, log: true}     # a float range (log scale: both bounds > 0)
    d_model: {low: 64, high: 256, step: 32}      # an int range, for an int flag
    batch_size: {choices: [128, 256, 512]}       # a list of choices (any flag)
    optimizer: [adamw, muon]                     # a bare list: choices too

Every bound and choice must pass the flag's own check. Flags not in the space come from
the command line and presets as usual; ``max_steps`` comes from the budget.

The objective is the task's own metric, its best value over a trial's evaluations, of the
better member when several train: multiply's val exact-match on its hardest operand class
(``exact_match_DxD`` for D = --max-digits), chat's val loss. Each evaluation is reported to
Optuna at the share of its budget done (per mille of its steps: with a budget in minutes,
trials of different step costs meet at equal training time), and Optuna may prune the
trial there (the run then ends saved, status ``pruned``).

Trials are counted toward ``--trials`` when they finish or are pruned; a trial that
fails or is interrupted (Ctrl+C, SIGTERM, a kill) is marked failed and another is run in
its place when the same command runs again. Workers on one machine take a file lock
before asking for a trial, so the count is exact; workers on several machines sharing one
RDB storage may together run up to (machines - 1) trials past it.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from trainlab.config import ConfigError, UsageError, build, field_type, parse_yaml, read_small_file

NOT_TUNABLE = frozenset({"runs_dir", "run_name", "tag", "progress", "device", "max_steps", "lr_decay_steps", "text",
                         "save_every_minutes"})
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PRUNERS = ("median", "hyperband", "none")
FINISHED = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class Dimension:
    """One searched flag: a range (``low``..``high``, ``log``, ``step``) or ``choices``."""

    name: str
    kind: str  # float, int or choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def distribution(self):
        import optuna.distributions as dist

        if self.kind == "choice":
            return dist.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return dist.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return dist.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def spec(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def edges(self) -> list[Any]:
        """The values whose validity stands for all: the choices, or both bounds."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


# -- the space file ---------------------------------------------------------------------------
def space_names(task: str) -> list[str]:
    from importlib import resources

    folder = resources.files("trainlab.presets") / task / "spaces"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def read_space(ref: str, task: str) -> tuple[str, Any]:
    """(a name for it, its parsed YAML): a shipped space by name, or a file."""
    from importlib import resources

    if ref in space_names(task):
        with resources.as_file(resources.files("trainlab.presets") / task / "spaces" / f"{ref}.yaml") as p:
            return ref, parse_yaml(read_small_file(p, "space file"), f"space {ref}")
    if not Path(ref).exists():
        shipped = ", ".join(space_names(task)) or "none"
        raise UsageError(f"--space: no file {ref!r} and no shipped space of that name (shipped for {task}: {shipped})")
    return Path(ref).stem, parse_yaml(read_small_file(ref, "space file"), f"space file {ref}")


def parse_space(data: Any, sections: list[tuple[str, type]], base: dict[str, Any], source: str
                ) -> dict[str, Dimension]:
    """The dimensions of a space file, every entry checked: known flag, well-formed range or
    choices, and each bound or choice accepted by the flag's own check (with the other
    settings as ``base`` has them)."""
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{source}: must be a mapping of flag: range or choices, with at least one entry")
    types = {f.name: field_type(cls, f) for _, cls in sections for f in fields(cls)}
    dims: dict[str, Dimension] = {}
    for raw_key, spec in data.items():
        key = str(raw_key).replace("-", "_")
        where = f"{source}: {key}"
        if key not in types:
            raise UsageError(f"{where}: not a flag of this task's train command")
        if key in NOT_TUNABLE:
            raise UsageError(f"{where}: cannot be searched (the budget sets max_steps; paths and names are fixed)")
        dims[key] = _dimension(key, types[key], spec, where)
    for dim in dims.values():
        for value in dim.edges():
            try:
                for _, cls in sections:
                    build(cls, {**base, dim.name: value})
            except ConfigError as e:
                raise UsageError(f"{source}: {dim.name}: {value!r} fails the flag's own check ({e})") from None
    return dims


def _dimension(key: str, t: type, spec: Any, where: str) -> Dimension:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: expected {{low: A, high: B}} or {{choices: [...]}}, got {str(spec)[:60]!r}")
    unknown = set(spec) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise UsageError(f"{where}: unknown key {sorted(unknown)[0]!r} (a range has low, high, log, step; "
                         f"a list has choices)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise UsageError(f"{where}: choices stand alone (no low/high/log/step beside them)")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: choices must be a non-empty list")
        if not all(isinstance(c, (bool, int, float, str)) for c in choices) or len(set(map(repr, choices))) != len(choices):
            raise UsageError(f"{where}: choices must be distinct numbers, strings or booleans")
        return Dimension(key, "choice", choices=tuple(choices))
    if t not in (int, float):
        raise UsageError(f"{where}: a {t.__name__} flag is searched with choices, not a range")
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"{where}: a range needs low and high")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"{where}: {name} must be a finite number, got {str(v)[:40]!r}")
        if t is int and not float(v).is_integer():
            raise UsageError(f"{where}: {name} must be a whole number for this int flag, got {v!r}")
    if not isinstance(log, bool):
        raise UsageError(f"{where}: log must be true or false")
    if low >= high:
        raise UsageError(f"{where}: the range is {'empty' if low == high else 'inverted'} (low {low}, high {high})")
    if log and low <= 0:
        raise UsageError(f"{where}: a log-scale range needs bounds above 0, got low {low}")
    if step is not None and (step <= 0 or log):
        raise UsageError(f"{where}: step must be positive, and cannot go with log")
    if t is int:
        return Dimension(key, "int", int(low), int(high), log, int(step) if step is not None else None)
    return Dimension(key, "float", float(low), float(high), log, float(step) if step is not None else None)


def space_json(dims: dict[str, Dimension]) -> str:
    """A canonical text of the space: a study remembers it, and refuses another."""
    return json.dumps({k: dims[k].spec() for k in sorted(dims)}, sort_keys=True)


# -- the study --------------------------------------------------------------------------------
@dataclass
class StudyPlan:
    """Everything a worker needs to run trials of one study."""

    name: str
    task: str  # the CLI's task word: multiply or chat
    storage: str  # an Optuna storage URL, or journal:PATH
    folder: Path  # <runs_dir>/tune/<study>: the lock, best.yaml and plots
    dims: dict[str, Dimension]
    base: dict[str, Any]  # settings of every trial before the searched ones
    trials: int
    budget_steps: int | None
    budget_minutes: float | None
    objective: str
    direction: str  # maximize or minimize
    pruner: str
    seed: int | None
    attrs: dict[str, Any] = field(default_factory=dict)
    enqueue: dict[str, Any] | None = None  # searched values the study tries first (--enqueue)

    def identity(self) -> dict[str, Any]:
        """What a study is, stored with it and compared when the same study is opened again."""
        return {"trainlab_task": self.task, "trainlab_space": space_json(self.dims), "trainlab_objective": self.objective,
                "trainlab_direction": self.direction}


def enqueued_params(path: str | Path, dims: dict[str, Dimension]) -> dict[str, Any]:
    """The searched values of a config file (a study's ``best.yaml``, say), each inside its
    dimension: the trial ``--enqueue`` makes the study try first. Keys the space does not
    search are left to the study's own settings."""
    from trainlab.config import load_yaml

    data = load_yaml(path)
    missing = [k for k in dims if k not in data]
    if missing:
        raise UsageError(f"--enqueue: {path} has no value for {', '.join(missing)}, which the space searches")
    out = {}
    for key, dim in dims.items():
        value = data[key]
        if dim.kind == "choice":
            ok = any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in dim.choices)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or (dim.kind == "int" and
                                                                              not isinstance(value, int)):
            ok = False
        else:
            ok = dim.low <= value <= dim.high
            if ok and dim.step is not None:
                k = (value - dim.low) / dim.step
                ok = abs(k - round(k)) < 1e-9
        if not ok:
            raise UsageError(f"--enqueue: {path}: {key}: {value!r} is outside the space ({dim.spec()})")
        out[key] = value
    return out


def enqueue_first(study, params: dict[str, Any]) -> bool:
    """Put ``params`` in the study's queue unless a trial with them is done, running or waiting
    (a continued study does not try them twice; one whose trial was killed tries again)."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    if any(t.params == params for t in study.get_trials(deepcopy=False, states=live)):
        return False
    study.enqueue_trial(params, user_attrs={"enqueued": True})
    return True


def default_objective(task: str, base: dict[str, Any]) -> tuple[str, str]:
    """(metric, direction): multiply's exact-match on its hardest class, chat's val loss."""
    if task == "multiply":
        d = int(base.get("max_digits", 3))
        return f"exact_match_{d}x{d}", "maximize"
    return "val_loss", "minimize"


def direction_of(metric: str) -> str:
    return "minimize" if ("loss" in metric or "perplexity" in metric) else "maximize"


def storage_url(storage: str | None, folder: Path) -> str:
    return storage or f"sqlite:///{folder / 'study.db'}"


def open_storage(url: str):
    """An Optuna storage for ``url``: ``journal:PATH`` (or a path ending in .log) is Optuna's
    journal file, for many processes on one filesystem; anything else an RDB URL."""
    import optuna

    if url.startswith("journal:") or (url.endswith(".log") and "://" not in url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.split(":", 1)[1] if url.startswith("journal:") else url))
    # a generous busy timeout: several workers write one SQLite file
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except (ValueError, ImportError) as e:
        raise UsageError(f"--storage: cannot open {url!r} ({str(e).splitlines()[0][:120]})") from None


def storage_exists(url: str) -> bool:
    """Whether a file-based storage is already on disk (so checking it writes nothing)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).exists()
    if url.startswith("journal:"):
        return Path(url.split(":", 1)[1]).exists()
    if url.endswith(".log") and "://" not in url:
        return Path(url).exists()
    return True  # a server: asking it writes nothing


def existing_study(plan: StudyPlan):
    """The study if it exists (after checking it is this one), else None; writes nothing."""
    import optuna

    if not storage_exists(plan.storage):
        return None
    storage = open_storage(plan.storage)
    try:
        study = optuna.load_study(study_name=plan.name, storage=storage)
    except KeyError:
        return None
    attrs = study.user_attrs
    if attrs.get("trainlab_task") != plan.task:
        raise UsageError(f"--study: study {plan.name!r} exists for task {attrs.get('trainlab_task')!r}, not "
                         f"{plan.task!r}; pick another --study")
    if attrs.get("trainlab_space") != space_json(plan.dims):
        raise UsageError(f"--study: study {plan.name!r} exists with another search space; pick another --study "
                         f"(or use the space it was made with)")
    if attrs.get("trainlab_objective") != plan.objective:
        raise UsageError(f"--study: study {plan.name!r} optimises {attrs.get('trainlab_objective')!r}, not "
                         f"{plan.objective!r}")
    return study


def create_or_load(plan: StudyPlan, worker: int = 0):
    """The study (made on first use, with its identity stored), with this worker's sampler and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan.folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(plan.storage)
    # workers seeded alike would suggest alike, and so would a continued study replay its first
    # suggestions: the seed moves on with the worker and with the trials already made
    made = 0
    try:
        made = len(optuna.load_study(study_name=plan.name, storage=storage).trials)
    except KeyError:
        pass
    seed = None if plan.seed is None else plan.seed + 1000 * worker + made
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(study_name=plan.name, storage=storage, sampler=sampler,
                                pruner=make_pruner(plan), direction=plan.direction, load_if_exists=True)
    if "trainlab_task" not in study.user_attrs:
        for k, v in {**plan.identity(), **plan.attrs}.items():
            study.set_user_attr(k, v)
    return study


def make_pruner(plan: StudyPlan):
    import optuna

    if plan.pruner == "none":
        return optuna.pruners.NopPruner()
    if plan.pruner == "hyperband":
        # resources are per mille of each trial's budget (see run_trial's reports)
        return optuna.pruners.HyperbandPruner(min_resource=100, max_resource=1000, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def fail_stale_trials(study, runs_dir: Path, grace_seconds: float = 120.0) -> list[int]:
    """Trials left RUNNING by a killed worker, marked failed: their run was killed while it
    trained (its lock is free, its status still 'running'), or the run ended more than
    ``grace_seconds`` ago and nobody told Optuna; a trial killed before its run existed,
    when it started that long ago. (A run that has just ended, whose worker is about to
    report it, is left alone.)"""
    import datetime

    from optuna.trial import TrialState

    from trainlab.engine.tracking import Run

    now = datetime.datetime.now()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = t.user_attrs.get("run_dir")
        started = t.datetime_start or now
        if run_dir:
            p = Path(run_dir)
            run = Run(p.name, p.parent.name, p)
            info = run.info()
            if run.in_use():
                dead = False
            elif run.effective_status(info) == "failed":
                dead = True
            else:
                try:
                    ended = datetime.datetime.fromisoformat(str(info.get("updated")))
                except ValueError:
                    ended = started
                dead = (now - ended).total_seconds() > grace_seconds
        else:
            dead = (now - started).total_seconds() > grace_seconds
        if dead:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    return failed


def best_value(evals: list[dict[str, float]], metric: str, direction: str) -> float:
    values = [float(e[metric]) for e in evals if metric in e and math.isfinite(float(e[metric]))]
    if not values:
        return math.nan
    return max(values) if direction == "maximize" else min(values)


def score(per_member: dict[str, float], direction: str) -> float:
    """The better member's value (NaN when no member has one)."""
    finite = [v for v in per_member.values() if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if direction == "maximize" else min(finite)


# -- one trial --------------------------------------------------------------------------------
class TrialInterrupted(KeyboardInterrupt):
    """A stop signal ended a trial: the study stops here (the trial is marked failed)."""


def run_trial(plan: StudyPlan, study, trial, kind, say: Callable[[str], None]) -> str:
    """Train one trial as an ordinary run and tell Optuna how it went; returns its state name."""
    from optuna.trial import TrialState

    from trainlab.engine.errors import TrainingError
    from trainlab.engine.loop import train
    from trainlab.runs import checked_task, new_run_from, steps_for_minutes

    values = {**plan.base, **trial.params, "run_name": f"{plan.name}-t{trial.number:04d}"}
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    try:
        if plan.budget_steps is not None:
            steps = plan.budget_steps
        else:
            # in the precision the trial will train in: under --precision auto a trial that picks
            # bf16 would otherwise be fitted to fp32's (or bf16's slow first) steps
            steps, _, _ = steps_for_minutes(kind, values, plan.budget_minutes)
        values.update(max_steps=steps, lr_decay_steps=steps)
        cfgs, task = checked_task(kind, values)
    except (ConfigError, UsageError) as e:  # a combination the flags refuse (say d_model and nhead)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        say(f"trial {trial.number}: {shown}: refused ({e}); another takes its place")
        return "FAIL"
    run, config = new_run_from(kind, cfgs, task, extra={"study": plan.name, "trial": trial.number}, quiet=True)
    trial.set_user_attr("run", run.key)
    trial.set_user_attr("run_dir", str(run.dir))
    trial.set_user_attr("max_steps", steps)
    say(f"trial {trial.number}: {shown}; {steps} steps, run {run.id}")

    def prune(step: int, metrics: dict[str, dict[str, float]]) -> bool:
        value = score({m: float(e.get(plan.objective, math.nan)) for m, e in metrics.items()}, plan.direction)
        if math.isfinite(value):
            # reported at the share of the budget done (per mille), not the step: with a budget in
            # minutes a small model takes more steps, and trials must be compared at equal time
            trial.report(value, round(1000 * step / steps))
        return trial.should_prune()

    t0 = time.perf_counter()
    try:
        summary = train(task, cfgs["train"], run, config, echo=lambda line: None, prune=prune)
    except TrainingError as e:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        say(f"trial {trial.number}: failed ({e})")
        return "FAIL"
    except KeyboardInterrupt:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise TrialInterrupted() from None
    per_member = {m.name: best_value(m.evals, plan.objective, plan.direction) for m in summary.members}
    value = score(per_member, plan.direction)
    took = time.perf_counter() - t0
    trial.set_user_attr("per_member", per_member)
    if summary.stop_reason == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        say(f"trial {trial.number}: pruned at step {summary.step} ({plan.objective} {_fmt(value)}), {took:.0f} s")
        return "PRUNED"
    if summary.interrupted:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise TrialInterrupted()
    if not math.isfinite(value):
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        say(f"trial {trial.number}: no {plan.objective} in its evaluations; marked failed")
        return "FAIL"
    study.tell(trial, value)
    say(f"trial {trial.number}: {plan.objective} {_fmt(value)} ({', '.join(f'{m} {_fmt(v)}' for m, v in per_member.items())}), "
        f"{took:.0f} s; best so far {_fmt(study.best_value)} (trial {study.best_trial.number})")
    return "COMPLETE"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def work(plan: StudyPlan, kind, worker: int = 0, say: Callable[[str], None] = print) -> dict[str, int]:
    """Run trials until the study holds ``plan.trials`` finished (or pruned) ones; returns the counts."""
    from trainlab.engine.tracking import file_lock

    study = create_or_load(plan, worker)
    distributions = {k: d.distribution() for k, d in plan.dims.items()}
    runs_dir = Path(plan.base.get("runs_dir", "runs"))
    refused_in_a_row = 0
    while True:
        with file_lock(plan.folder / "workers.lock"):  # count and ask as one step: no two workers take the last slot
            stale = fail_stale_trials(study, runs_dir)
            if stale:
                say(f"marked failed: trial(s) {', '.join(map(str, stale))}, left running by a worker that died")
            c = counts(study)
            taken = sum(c.get(s, 0) for s in (*FINISHED, "RUNNING", "WAITING"))
            if taken >= plan.trials:
                return c
            trial = study.ask(distributions)
        state = run_trial(plan, study, trial, kind, say)
        refused_in_a_row = refused_in_a_row + 1 if state == "FAIL" else 0
        if refused_in_a_row >= 5:
            raise UsageError("5 trials in a row failed; look at the lines above (a space whose combinations the "
                             "flags refuse, or a recipe that diverges)")


# -- looking at a study -----------------------------------------------------------------------
def default_settings(sections: list[tuple[str, type]]) -> dict[str, Any]:
    import dataclasses

    out = {}
    for _, cls in sections:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
    return out


def best_settings(study, sections: list[tuple[str, type]]) -> dict[str, Any]:
    """The best trial's settings as a config file: the study's own settings (its preset and
    flags) that differ from the defaults, every searched value, and its step count. A searched
    value is kept even where it equals the default: the file is also laid over the study's
    preset (``multiply compare --preset P --recipe-simple best.yaml``), and a dropped
    ``abacus: false`` there would come back as the preset's ``true``. Paths, names and tags
    are left to the command line."""
    base = json.loads(study.user_attrs.get("trainlab_base", "{}"))
    best = study.best_trial
    settings = {**base, **best.params}
    steps = best.user_attrs.get("max_steps")
    if steps:
        settings.update(max_steps=steps)
    defaults = default_settings(sections)
    out = {k: v for k, v in settings.items()
           if k not in ("runs_dir", "run_name", "tag", "progress", "device", "lr_decay_steps")
           and (k in best.params or defaults.get(k, object()) != v)}
    return dict(sorted(out.items()))


def importances(study) -> dict[str, float] | None:
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < 2:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return None


def save_plots(study, folder: Path) -> list[Path]:
    """Optuna's own matplotlib plots of the history and (with two finished trials) the importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in (("history.png", ovm.plot_optimization_history), ("importances.png", ovm.plot_param_importances)):
            if name == "importances.png" and importances(study) is None:
                continue
            try:
                ax = plot(study)
            except (ValueError, RuntimeError):
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.tight_layout()
            fig.savefig(folder / name, dpi=110)
            plt.close(fig)
            written.append(folder / name)
    return written


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-able settings (what a study stores of its base)."""
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None)))}

