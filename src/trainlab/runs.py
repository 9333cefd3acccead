"""The run path: how any caller, the command line or Python, starts, resumes and finishes a
training run. ``trainlab tune``, ``multiply compare`` and the benchmarks train through
these functions, so a trial, a seed or a benchmark's run is an ordinary run.

    from trainlab import runs

    values = runs.settings("multiply", preset="demo", flags={"max_steps": 300, "run_name": "mine"})
    summary = runs.train("multiply", values)          # a new run, trained to --max-steps
    print(summary.run.dir, summary.step)
    runs.train("multiply", values, resume="mine")     # continue it (its own settings win)

What lives here:

- the task registry: a ``TaskKind`` per task (its settings sections, what a resumed run
  may change, how to build the task and describe it), ``task_kind("multiply"|"chat")``;
- settings: defaults < preset < config file < flags, as one flat dict of field values
  (``settings``), and the rules of a resumed run (``resume_settings``: its own settings,
  changed only where a resume may change them);
- ``checked_task`` (every check, nothing written), ``new_run_from`` (a run in the index),
  ``train`` (a new or resumed run, on one process or under torchrun) and ``run_to_end``
  (made, resumed or left alone: what ``multiply compare`` builds its seeds with).

Importing this module loads no PyTorch: the sections are plain dataclasses
(``multiply/config.py``, ``chat/config.py``, ``engine/train_config.py``), and the tasks and
the engine are imported when a run is built.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from trainlab.chat.config import RESUMABLE_TASK_CHANGES as CHAT_RESUMABLE
from trainlab.chat.config import TASK_NAME as CHAT_TASK
from trainlab.chat.config import ChatDataConfig, ChatTaskConfig, GPTConfig
from trainlab.config import DEFAULT_PRESETS, ConfigError, build, check_known_keys, flag_name, flat_settings, \
    load_preset, load_yaml
from trainlab.engine.errors import CheckpointError
from trainlab.engine.train_config import RESUMABLE_CHANGES, TrainConfig
from trainlab.multiply.config import RESUMABLE_TASK_CHANGES as MULTIPLY_RESUMABLE
from trainlab.multiply.config import TASK_NAME as MULTIPLY_TASK
from trainlab.multiply.config import (
    LossConfig,
    MultiplyDataConfig,
    MultiplyTaskConfig,
    Seq2SeqConfig,
    TeacherForcingConfig,
)

Echo = Callable[[str], None]


def warn(line: str) -> None:
    sys.stderr.write(line + "\n")


# -- the task registry -------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskKind:
    """What the run path knows of one task."""

    command: str  # its word on the command line: multiply, chat
    task_name: str  # its folder under the runs folder, and the task id in checkpoints
    sections: Callable[[], list[tuple[str, type]]]  # (section, config class), in order
    free: frozenset[str]  # the task's settings a resumed run may change
    make_task: Callable[[dict[str, Any]], Any]  # configs by section -> the task (may refuse them)
    describe: Callable[[dict[str, Any], Any], tuple[str, list[str]]]  # -> index summary, lines to print


def multiply_sections() -> list[tuple[str, type]]:
    return [("data", MultiplyDataConfig), ("model", Seq2SeqConfig), ("loss", LossConfig),
            ("teacher_forcing", TeacherForcingConfig), ("task", MultiplyTaskConfig), ("train", TrainConfig)]


def chat_sections() -> list[tuple[str, type]]:
    return [("data", ChatDataConfig), ("model", GPTConfig), ("task", ChatTaskConfig), ("train", TrainConfig)]


def _make_multiply(cfgs: dict[str, Any]):
    from dataclasses import replace

    from trainlab.multiply.task import MultiplyTask, sequence_length

    # the lengths the members are built with, so run.json and config.json say what they are
    n = sequence_length(cfgs["data"])
    cfgs["model"] = replace(cfgs["model"], src_len=n, tgt_len=n)
    task = MultiplyTask(cfgs["data"], cfgs["model"], cfgs["loss"], cfgs["teacher_forcing"], cfgs["task"], cfgs["train"])
    counts = task.dataset.split_counts()
    if counts["train"] == 0:
        raise ConfigError("min_digits", "this digit range leaves no training problems")
    if counts["val"] == 0:  # the first evaluation would have nothing to score
        raise ConfigError("val_fraction", f"this digit range and --val-fraction {cfgs['data'].val_fraction:g} leave "
                                          f"no validation problems")
    return task


def _describe_multiply(cfgs: dict[str, Any], task) -> tuple[str, list[str]]:
    d, mc, tc = cfgs["data"], cfgs["model"], cfgs["train"]
    counts = task.dataset.split_counts()
    layers = f"{mc.num_layers}" if mc.n_dec == mc.num_layers else f"{mc.num_layers}+{mc.n_dec}"
    summary = (f"{d.min_digits}-{d.max_digits} digits, d_model {mc.d_model}, {layers} layers, "
               f"{mc.num_latent} latents, batch {tc.batch_size}, members {cfgs['task'].members}")
    about = "" if task.dataset.counts_exact else "about "
    return summary, [f"problems: {about}{counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test "
                     f"({d.min_digits}-{d.max_digits} digits, answers {d.answer_order})"]


def _make_chat(cfgs: dict[str, Any]):
    from trainlab.chat.task import make_chat_task

    return make_chat_task(cfgs)


def _describe_chat(cfgs: dict[str, Any], task) -> tuple[str, list[str]]:
    from trainlab.engine.device import resolve_device

    mc, tc, c = cfgs["model"], cfgs["train"], task.corpus
    summary = (f"{Path(c.source).name}, d_model {mc.d_model}, {mc.num_layers} layers, {mc.nhead} heads, "
               f"context {mc.context_len}, batch {tc.batch_size}")
    lines = [f"corpus {c.source}: {len(c.tokens):,} characters ({len(c.train):,} train, {len(c.val):,} val), "
             f"{c.vocab.size} distinct; dialogue style {task.speakers['style']}"]
    if resolve_device(tc.device).type == "cpu" and 12 * mc.d_model ** 2 * mc.num_layers > 5e6:
        lines.append(f"note: a {mc.d_model}-wide, {mc.num_layers}-layer model trains slowly on a CPU "
                     f"(seconds a step); --preset nanogpt-cpu is a CPU-sized one")
    return summary, lines


KINDS = {
    "multiply": TaskKind("multiply", MULTIPLY_TASK, multiply_sections, MULTIPLY_RESUMABLE, _make_multiply,
                         _describe_multiply),
    "chat": TaskKind("chat", CHAT_TASK, chat_sections, CHAT_RESUMABLE, _make_chat, _describe_chat),
}


def task_kind(command: str | TaskKind) -> TaskKind:
    """The kind for ``multiply`` or ``chat`` (a kind is returned as it is)."""
    if isinstance(command, TaskKind):
        return command
    try:
        return KINDS[command]
    except KeyError:
        raise ValueError(f"no task {command!r} (have: {', '.join(KINDS)})") from None


# -- settings ----------------------------------------------------------------------------------
def settings(command: str | TaskKind, preset: str | None = None, config_file: str | Path | None = None,
             flags: dict[str, Any] | None = None, default_preset: bool = True) -> dict[str, Any]:
    """Defaults < preset (``preset``, else the task's default one unless ``default_preset`` is
    false) < config file < ``flags``, as one flat dict of field values. Unknown keys in a
    preset or file are refused; ``flags`` are taken as they are (builds ignore keys no
    section owns)."""
    kind = task_kind(command)
    classes = [cls for _, cls in kind.sections()]
    values: dict[str, Any] = {}
    name = preset or (DEFAULT_PRESETS.get(kind.command) if default_preset else None)
    for source, layer in ((f"preset {name}", load_preset(kind.command, name) if name else None),
                          (str(config_file), load_yaml(config_file) if config_file else None),
                          ("the command line", flags)):
        if layer:
            if source != "the command line":
                check_known_keys(layer, classes, source)
            values.update(_one_length(layer, values, source))
    return values


def _one_length(layer: dict[str, Any], below: dict[str, Any], source: str) -> dict[str, Any]:
    """How long to train is said once: a layer giving both --max-steps and --minutes is refused;
    one giving either replaces the other from the layers below (a flag's --max-steps over a
    preset's budget, a flag's --minutes over a preset's step count)."""
    steps, minutes = layer.get("max_steps"), layer.get("minutes")
    if steps is not None and minutes is not None:
        raise ConfigError("minutes", f"{source} gives both --max-steps and --minutes: give one (steps, or a time "
                                     f"budget that fits the steps)")
    if steps is not None and below.get("minutes") is not None:
        return {**layer, "minutes": None}
    if minutes is not None and below.get("max_steps") is not None:
        return {**layer, "max_steps": None}
    return layer


def resume_settings(run_values: dict[str, Any], given: dict[str, Any], free: frozenset[str] | set[str],
                    run_id: str, warn: Echo = warn, echo: Echo = print, known: set[str] | frozenset[str] = frozenset()
                    ) -> dict[str, Any]:
    """The settings of a resumed run: the run's own, with ``given`` (flags, file, preset)
    applied only where ``free`` allows. Every other given value that differs is reported
    in one line naming both values, and the run's value is kept. A setting of the task
    (``known``) that the run's saved settings lack (an option added since it started) applies
    where ``free`` allows and is otherwise named in one warning: the run keeps what it was
    built with (the option's default)."""
    values = dict(run_values)
    for key, new in given.items():
        if key not in values:
            if key not in known:  # not a setting of this task: the namespace's other entries
                continue
            if key in free:
                values[key] = new
                echo(f"{flag_name(key)}: {new} from here on (run {run_id} was saved before the option existed)")
            else:
                warn(f"warning: {flag_name(key)} {new} ignored: run {run_id} was saved before the option existed, "
                     f"and a resumed run keeps what it was built with")
            continue
        old = values[key]
        if new == old:
            continue
        if key in free:
            values[key] = new
            echo(f"{flag_name(key)}: {old} -> {new} from here on")
        else:
            shown = repr(old) if isinstance(old, str) else old
            warn(f"warning: {flag_name(key)} {new} ignored: run {run_id} was made with {shown}, "
                 f"and a resumed run keeps its own")
    return values


def known_settings(command: str | TaskKind, values: dict[str, Any]) -> dict[str, Any]:
    """Only the keys some section of the task owns (a namespace's other entries dropped)."""
    import dataclasses

    known = {f.name for _, cls in task_kind(command).sections() for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in known}


# -- checks and new runs -----------------------------------------------------------------------
def checked_task(command: str | TaskKind, values: dict[str, Any], world: int = 1, warn: Echo = warn
                 ) -> tuple[dict[str, Any], Any]:
    """The section configs built from ``values`` and the task made from them, every check done
    (settings, device, precision, model size): nothing is written."""
    from trainlab.engine.device import resolve_device
    from trainlab.engine.precision import resolve_precision, slow_precision_warning

    kind = task_kind(command)
    cfgs = {name: build(cls, values) for name, cls in kind.sections()}
    # fail on a missing device, or a precision it lacks, before creating a run
    device = resolve_device(cfgs["train"].device)
    resolve_precision(cfgs["train"].precision, device)
    slow = slow_precision_warning(cfgs["train"].precision, device)
    if slow:
        warn(slow)
    if cfgs["train"].batch_size < world:
        raise ConfigError("batch_size", f"must be at least the number of processes ({world}), "
                                        f"got {cfgs['train'].batch_size}")
    return cfgs, kind.make_task(cfgs)


def steps_for_minutes(command: str | TaskKind, values: dict[str, Any], minutes: float) -> tuple[int, float, str]:
    """(steps, seconds a step, the precision timed) that fill ``minutes`` of training with
    ``values``: a few steps timed after warm-up, in the precision the run will train in. What a
    tune trial's and a comparison's time budget become."""
    from trainlab.engine.budget import fit_steps
    from trainlab.engine.step import fitted_seconds_per_step

    cfgs, task = checked_task(command, {**values, "max_steps": 1, "minutes": None})
    sps, how, _ = fitted_seconds_per_step(task, cfgs["train"], None, n=5, warmup=3)
    return fit_steps(minutes * 60, sps), sps, how


def new_run_from(command: str | TaskKind, cfgs: dict[str, Any], task: Any, extra: dict[str, Any] | None = None,
                 quiet: bool = False, echo: Echo = print):
    """A new run of ``task`` in the runs index (``extra``: more fields for its run.json, such as
    the study and trial it belongs to); returns (run, config by section)."""
    from trainlab.engine.tracking import new_run

    kind = task_kind(command)
    config = {name: asdict(c) for name, c in cfgs.items()}
    tc = cfgs["train"]
    summary, lines = kind.describe(cfgs, task)
    run = new_run(tc.runs_dir, task.name, tc.run_name, tc.tag, config, summary=summary)
    if extra:
        run.update(**extra)
    if not quiet:
        echo(f"run {run.id}: {run.dir}")
        _note_extension(tc, echo)
        for line in lines:
            echo(line)
    return run, config


def _keep_an_open_schedule(saved: dict[str, Any], given: dict[str, Any], values: dict[str, Any], run_id: str,
                           echo: Echo) -> dict[str, Any]:
    """A run started without --max-steps (or --lr-decay-steps) has no horizon: its LR stays
    at --lr after warm-up. A resume that sets --max-steps only says where it stops; fitting a
    decay to it now would drop the LR at once to where that schedule would be mid-run, so the
    LR stays constant (``schedule: constant``), unless --lr-decay-steps is given too."""
    open_ended = saved.get("max_steps") is None and saved.get("lr_decay_steps") is None
    if not open_ended or values.get("max_steps") is None or "lr_decay_steps" in given \
            or saved.get("schedule") == "constant":
        return values
    echo(f"note: run {run_id} started without --max-steps, so its LR has no decay to end at step "
         f"{values['max_steps']}: it stays at --lr to the end (schedule constant)")
    return {**values, "schedule": "constant"}


def _extends_finished(r: "Resumption", saved: dict[str, Any], given: dict[str, Any], echo: Echo) -> bool:
    """New --minutes for a resumed run: an extension of a finished run (fitted as new minutes
    from where it ended); any other resumed run keeps its own budget (``resume_settings``
    says so in one warning)."""
    new = given.get("minutes")
    if new is None or new == saved.get("minutes"):
        return False
    done = r.ckpt is not None and r.run.info().get("status") == "finished" and \
        saved.get("max_steps") is not None and r.ckpt.step >= int(saved["max_steps"])
    if done:
        echo(f"run {r.run.id} finished at step {r.ckpt.step}: {new:g} more minutes are fitted from there, at the "
             f"LR its schedule ended at")
    return done


def _note_extension(tc: TrainConfig, echo: Echo) -> None:
    if tc.max_steps and tc.lr_decay_steps and tc.max_steps > tc.lr_decay_steps:
        echo(f"note: the LR schedule ends at step {tc.lr_decay_steps}; steps after it run at the final LR "
             f"({tc.min_lr_ratio:g} x --lr). Pass --lr-decay-steps to stretch it.")


# -- resuming ----------------------------------------------------------------------------------
@dataclass
class Resumption:
    """A run about to be resumed (and locked): what it continues from and what it skips."""

    run: Any  # engine.tracking.Run
    ckpt: Any  # engine.checkpoint.Checkpoint, or None: start the run over from step 0
    config: dict[str, Any]  # the run's own saved settings, by section
    damaged: list[tuple[Path, str]]  # newer checkpoints that failed to load, and why


def open_for_resume(ref: str, task: str, runs_dir: str, tag: str, echo: Echo = print) -> Resumption | None:
    """The run to resume, or None for ``auto`` with nothing to resume. The run is locked on
    return; nothing is changed on disk yet."""
    from trainlab.engine.checkpoint import resume_checkpoint
    from trainlab.engine.tracking import find_run, scan_runs

    if ref == "auto":
        candidates = [r for r in scan_runs(runs_dir, task) if r.info().get("tag", "") == tag
                      and r.effective_status() in ("failed", "interrupted")]
        if not candidates:
            echo(f"--resume auto: no unfinished {task} run with tag {tag!r} in {runs_dir}; starting a new run")
            return None
        run = candidates[-1]
    else:
        run = find_run(runs_dir, task, ref)
    run.acquire()
    try:
        ckpt, damaged = resume_checkpoint(run.checkpoints, task)
        if ckpt is not None:
            config = ckpt.json("config.json")
        else:
            config = run.info().get("config")
            if not isinstance(config, dict) or not config:
                raise CheckpointError(f"run {run.id} has no usable checkpoint and no saved config; nothing to resume")
            echo(f"run {run.id} has no usable checkpoint: starting it over from step 0 with its own settings")
    except BaseException:
        run.release()
        raise
    return Resumption(run, ckpt, config, damaged)


def begin_resume(r: Resumption, warn: Echo = warn, echo: Echo = print) -> None:
    """Once every setting is checked: report and move aside damaged checkpoints, say where we start."""
    from trainlab.engine.checkpoint import move_aside

    for path, reason in r.damaged:
        warn(f"warning: {reason} (moved aside to {move_aside(path).name})")
    echo(f"resuming run {r.run.id} from step {r.ckpt.step if r.ckpt else 0}: {r.run.dir}")


# -- training ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A run ready to train: checked, in the index, locked if resumed."""

    task: Any
    train: TrainConfig
    run: Any  # engine.tracking.Run
    config: dict[str, Any]  # the settings by section, as run.json and config.json hold them
    ckpt: Any  # the checkpoint it resumes from, or None
    restart: bool  # a resumed run (from a checkpoint, or over from step 0 with its own settings)


def prepare(command: str | TaskKind, values: dict[str, Any], resume: str | None = None, world: int = 1,
            extra: dict[str, Any] | None = None, fresh: Callable[[], dict[str, Any]] | None = None,
            echo: Echo = print, warn: Echo = warn) -> Prepared:
    """The checks, then the run: a new one, or the one ``resume`` names (locked).

    ``fresh``: the settings of a new run when ``resume="auto"`` finds nothing to resume
    (default ``values``): a caller that left out the default preset for a resumed run's sake
    gives it back here."""
    from trainlab.engine.state import check_compatible

    kind = task_kind(command)
    resuming = None
    if resume:
        resuming = open_for_resume(resume, kind.task_name, values.get("runs_dir", "runs"), values.get("tag", ""),
                                   echo=echo)
        if resuming is None and fresh is not None:  # auto found nothing: a new run, on the usual defaults
            values = fresh()
    if resuming is not None:
        saved = flat_settings(resuming.config)
        given = values
        free = RESUMABLE_CHANGES | kind.free
        if _extends_finished(resuming, saved, given, echo):
            free = free | {"minutes"}
        values = resume_settings(saved, given, free, resuming.run.id, warn=warn, echo=echo,
                                 known=set(known_settings(kind, given)))
        values = _keep_an_open_schedule(saved, given, values, resuming.run.id, echo)
    try:
        cfgs, task = checked_task(kind, values, world, warn=warn)
        if resuming is not None and resuming.ckpt is not None:
            check_compatible(resuming.ckpt, task, task.member_names)
    except BaseException:
        if resuming is not None:
            resuming.run.release()
        raise
    tc = cfgs["train"]
    if resuming is None:
        run, config = new_run_from(kind, cfgs, task, extra, echo=echo)
        return Prepared(task, tc, run, config, None, False)
    config = {name: asdict(c) for name, c in cfgs.items()}
    begin_resume(resuming, warn=warn, echo=echo)
    _note_extension(tc, echo)
    for line in kind.describe(cfgs, task)[1]:
        echo(line)
    return Prepared(task, tc, resuming.run, config, resuming.ckpt, True)


def train(command: str | TaskKind, values: dict[str, Any], resume: str | None = None,
          fresh: Callable[[], dict[str, Any]] | None = None, echo: Echo = print, warn: Echo = warn,
          started: float | None = None, extra: dict[str, Any] | None = None):
    """Train a run to its end (``max_steps``, a stop signal, a prune): a new run from ``values``,
    or the run ``resume`` names (an id, a folder, or ``auto``), kept to its own settings except
    where a resume may change them. Returns the loop's ``Summary`` (``summary.run`` is the run,
    ``summary.interrupted`` says whether a signal stopped it).

    Under torchrun, rank 0 does the checks and makes (or locks) the run, and tells the other
    ranks which run to train with which settings; they only read. A rank past 0 whose rank 0
    refused the settings returns None (rank 0 raised, saying why).

    ``started``: the ``time.monotonic()`` a ``--minutes`` budget counts from (the command line
    passes its process's start); default the moment of this call. ``extra``: more fields for a
    new run's run.json (how ``--preset auto`` chose, say)."""
    import time

    from trainlab.engine import distributed

    started = time.monotonic() if started is None else started

    kind = task_kind(command)
    d = distributed.setup(str(values.get("device", "auto")))
    try:
        if not d.main:
            return _follow_rank_zero(d, kind, echo)
        try:
            p = prepare(kind, values, resume, d.world, extra=extra, fresh=fresh, echo=echo, warn=warn)
        except BaseException:
            distributed.broadcast(None, d)  # the other ranks leave quietly; this one says why
            raise
        if d.active:
            echo(f"training on {d.world} processes (torchrun): each takes a slice of every batch of "
                 f"{p.train.batch_size}")
        distributed.broadcast({"run": [p.run.id, p.run.task, str(p.run.dir)],
                               "checkpoint": p.ckpt and str(p.ckpt.path), "config": p.config,
                               "restart": p.restart}, d)
        # --preset auto timed fp32 against bf16 for the recipe it chose: a new run decides by that
        timed = (extra or {}).get("auto", {}).get("timings") if p.ckpt is None else None
        return _train_prepared(p, echo, started, timed)
    finally:
        distributed.teardown()


def _train_prepared(p: Prepared, echo: Echo, started: float | None = None,
                    timed_precisions: dict[str, float] | None = None):
    from trainlab.engine import distributed
    from trainlab.engine.loop import train as engine_train

    summary = engine_train(p.task, p.train, p.run, p.config, resume=p.ckpt, restart=p.restart, echo=echo,
                           started=started, timed_precisions=timed_precisions)
    distributed.barrier(distributed.current())
    return summary


def _follow_rank_zero(d: Any, kind: TaskKind, echo: Echo):
    """A rank past 0: train the run rank 0 prepared, with the settings it resolved."""
    from trainlab.engine import distributed
    from trainlab.engine.checkpoint import Checkpoint
    from trainlab.engine.tracking import Run

    plan = distributed.broadcast(None, d)
    if plan is None:  # rank 0 refused the settings and says why
        return None
    values = flat_settings(plan["config"])
    cfgs = {name: build(cls, values) for name, cls in kind.sections()}
    task = kind.make_task(cfgs)
    run_id, task_name, run_dir = plan["run"]
    ckpt = Checkpoint(Path(plan["checkpoint"]), task_name) if plan["checkpoint"] else None
    p = Prepared(task, cfgs["train"], Run(run_id, task_name, Path(run_dir)), plan["config"], ckpt, plan["restart"])
    return _train_prepared(p, echo)


def run_to_end(command: str | TaskKind, values: dict[str, Any], name: str, extra: dict[str, Any] | None = None,
               echo: Echo = print):
    """The run ``name`` trained to its ``max_steps``: made if it does not exist, resumed if it
    stopped early, left alone if it is done. Returns (the run, its summary or None when there
    was nothing to do). What ``multiply compare`` builds its seeds with."""
    from trainlab.engine.tracking import Run

    kind = task_kind(command)
    root = Path(values.get("runs_dir", "runs")) / kind.task_name / name
    values = {**values, "run_name": name}
    resume = None
    if (root / "run.json").is_file():
        info = Run(name, kind.task_name, root).info()
        if info.get("status") == "finished" and info.get("step") == values.get("max_steps"):
            return Run(name, kind.task_name, root), None
        resume = name
    p = prepare(kind, values, resume, extra=extra, echo=echo)
    return p.run, _train_prepared(p, echo)
