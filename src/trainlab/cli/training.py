"""``train`` for every task: a new run or a resumed one, on one process or under torchrun.

A ``TaskKind`` is what the CLI knows of a task: its settings sections, what a resumed run
may change, how to build the task from its configs and how to describe it. ``trainlab
tune`` and ``multiply compare`` build their runs through ``new_run_from`` here, so a trial
or a seed is an ordinary run."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from trainlab.cli.common import DEFAULT_PRESETS, EXIT_USAGE, flat, resume_settings, settings_from, warn
from trainlab.config import ConfigError, build
from trainlab.engine.checkpoint import CheckpointError
from trainlab.engine.loop import TrainConfig


@dataclass(frozen=True)
class TaskKind:
    """What the CLI knows of one task."""

    command: str  # its word on the command line: multiply, chat
    task_name: str  # its folder under the runs folder, and the task id in checkpoints
    sections: Callable[[], list[tuple[str, type]]]  # (section, config class), in order
    free: frozenset[str]  # the task's settings a resumed run may change
    make_task: Callable[[dict[str, Any]], Any]  # configs by section -> the task (may refuse them)
    describe: Callable[[dict[str, Any], Any], tuple[str, list[str]]]  # -> index summary, lines to print


def _multiply_sections() -> list[tuple[str, type]]:
    from trainlab.multiply.data import MultiplyDataConfig
    from trainlab.multiply.loss import LossConfig
    from trainlab.multiply.models import Seq2SeqConfig
    from trainlab.multiply.task import MultiplyTaskConfig, TeacherForcingConfig

    return [("data", MultiplyDataConfig), ("model", Seq2SeqConfig), ("loss", LossConfig),
            ("teacher_forcing", TeacherForcingConfig), ("task", MultiplyTaskConfig), ("train", TrainConfig)]


def _chat_sections() -> list[tuple[str, type]]:
    from trainlab.chat.data import ChatDataConfig
    from trainlab.chat.model import GPTConfig
    from trainlab.chat.task import ChatTaskConfig

    return [("data", ChatDataConfig), ("model", GPTConfig), ("task", ChatTaskConfig), ("train", TrainConfig)]


def _make_multiply(cfgs: dict[str, Any]):
    from dataclasses import replace

    from trainlab.multiply.task import MultiplyTask, sequence_length

    # the lengths the members are built with, so run.json and config.json say what they are
    n = sequence_length(cfgs["data"])
    cfgs["model"] = replace(cfgs["model"], src_len=n, tgt_len=n)
    task = MultiplyTask(cfgs["data"], cfgs["model"], cfgs["loss"], cfgs["teacher_forcing"], cfgs["task"], cfgs["train"])
    if task.dataset.split_counts()["train"] == 0:
        raise ConfigError("min_digits", "this digit range leaves no training problems")
    return task


def _describe_multiply(cfgs: dict[str, Any], task) -> tuple[str, list[str]]:
    d, mc, tc = cfgs["data"], cfgs["model"], cfgs["train"]
    counts = task.dataset.split_counts()
    layers = f"{mc.num_layers}" if mc.n_dec == mc.num_layers else f"{mc.num_layers}+{mc.n_dec}"
    summary = (f"{d.min_digits}-{d.max_digits} digits, d_model {mc.d_model}, {layers} layers, "
               f"{mc.num_latent} latents, batch {tc.batch_size}, members {cfgs['task'].members}")
    return summary, [f"problems: {counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test "
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


def task_kind(command: str) -> TaskKind:
    """The kind for ``multiply`` or ``chat`` (imported only when asked for: torch is slow to load)."""
    if command == "multiply":
        from trainlab.multiply.task import RESUMABLE_TASK_CHANGES, TASK_NAME

        return TaskKind("multiply", TASK_NAME, _multiply_sections, RESUMABLE_TASK_CHANGES, _make_multiply,
                        _describe_multiply)
    if command == "chat":
        from trainlab.chat.task import RESUMABLE_TASK_CHANGES, TASK_NAME

        return TaskKind("chat", TASK_NAME, _chat_sections, RESUMABLE_TASK_CHANGES, _make_chat, _describe_chat)
    raise ValueError(f"no task {command!r}")


@dataclass
class Resumption:
    """A run about to be resumed (and locked): what it continues from and what it skips."""

    run: Any  # engine.tracking.Run
    ckpt: Any  # engine.checkpoint.Checkpoint, or None: start the run over from step 0
    config: dict[str, Any]  # the run's own saved settings, by section
    damaged: list[tuple[Path, str]]  # newer checkpoints that failed to load, and why


def open_for_resume(ref: str, task: str, runs_dir: str, tag: str) -> Resumption | None:
    """The run to resume, or None for --resume auto with nothing to resume. The run is
    locked on return; nothing is changed on disk yet."""
    from trainlab.engine.checkpoint import resume_checkpoint
    from trainlab.engine.tracking import find_run, scan_runs

    if ref == "auto":
        candidates = [r for r in scan_runs(runs_dir, task) if r.info().get("tag", "") == tag
                      and r.effective_status() in ("failed", "interrupted")]
        if not candidates:
            print(f"--resume auto: no unfinished {task} run with tag {tag!r} in {runs_dir}; starting a new run")
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
            print(f"run {run.id} has no usable checkpoint: starting it over from step 0 with its own settings")
    except BaseException:
        run.release()
        raise
    return Resumption(run, ckpt, config, damaged)


def begin_resume(r: Resumption) -> None:
    """Once every setting is checked: report and move aside damaged checkpoints, say where we start."""
    from trainlab.engine.checkpoint import move_aside

    for path, reason in r.damaged:
        sys.stderr.write(f"warning: {reason} (moved aside to {move_aside(path).name})\n")
    print(f"resuming run {r.run.id} from step {r.ckpt.step if r.ckpt else 0}: {r.run.dir}")


def start_or_resume(args: argparse.Namespace, kind: TaskKind) -> int:
    """Every task's ``train`` command: a new run, or ``--resume`` of an existing one.

    ``kind.make_task(cfgs)`` builds the task from the section configs (and may reject them,
    or complete them with what only the data knows, such as a vocabulary size);
    ``kind.describe(cfgs, task)`` gives the one-line settings summary for the runs index and
    lines to print before training. All checks happen before anything is written.

    Under torchrun, rank 0 does all of this and tells the other ranks which run (and
    checkpoint) to train with which settings; they only read."""
    from trainlab.engine import distributed

    default_preset = DEFAULT_PRESETS.get(args.task)
    # a resumed run has its own settings: the default preset must not read as flags against them
    values = settings_from(args, kind.sections(), None if args.resume else default_preset)
    d = distributed.setup(str(values.get("device", "auto")))
    try:
        if not d.main:
            return _follow_rank_zero(d, kind)
        try:
            task, tc, run, config, ckpt, restart = _prepare_run(args, kind, values, default_preset, d)
        except BaseException:
            distributed.broadcast(None, d)  # the other ranks leave quietly; this one says why
            raise
        distributed.broadcast({"run": [run.id, run.task, str(run.dir)], "checkpoint": ckpt and str(ckpt.path),
                               "config": config, "restart": restart}, d)
        return _train_run(task, tc, run, config, ckpt, restart)
    finally:
        distributed.teardown()


def _train_run(task: Any, tc: TrainConfig, run: Any, config: dict[str, Any], ckpt: Any, restart: bool) -> int:
    from trainlab.engine import distributed
    from trainlab.engine.loop import train
    from trainlab.engine.stopping import exit_status

    result = train(task, tc, run, config, resume=ckpt, restart=restart)
    distributed.barrier(distributed.current())
    return exit_status(result.stop_signal) if result.interrupted else 0


def _follow_rank_zero(d: Any, kind: TaskKind) -> int:
    """A rank past 0: train the run rank 0 prepared, with the settings it resolved."""
    from trainlab.engine import distributed
    from trainlab.engine.checkpoint import Checkpoint
    from trainlab.engine.tracking import Run

    plan = distributed.broadcast(None, d)
    if plan is None:  # rank 0 refused the settings and says why
        return EXIT_USAGE
    values = flat(plan["config"])
    cfgs = {name: build(cls, values) for name, cls in kind.sections()}
    task = kind.make_task(cfgs)
    run_id, task_name, run_dir = plan["run"]
    ckpt = Checkpoint(Path(plan["checkpoint"]), task_name) if plan["checkpoint"] else None
    return _train_run(task, cfgs["train"], Run(run_id, task_name, Path(run_dir)), plan["config"], ckpt,
                      plan["restart"])


def checked_task(kind: TaskKind, values: dict[str, Any], world: int = 1) -> tuple[dict[str, Any], Any]:
    """The section configs built from ``values`` and the task made from them, every check done
    (settings, device, precision, model size): nothing is written."""
    from trainlab.engine.device import resolve_device
    from trainlab.engine.precision import resolve_precision, slow_precision_warning

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


def new_run_from(kind: TaskKind, cfgs: dict[str, Any], task: Any, extra: dict[str, Any] | None = None,
                 quiet: bool = False):
    """A new run of ``task`` in the runs index (``extra``: more fields for its run.json, such as
    the study and trial it belongs to); returns (run, config by section)."""
    from trainlab.engine.tracking import new_run

    config = {name: asdict(c) for name, c in cfgs.items()}
    tc = cfgs["train"]
    summary, lines = kind.describe(cfgs, task)
    run = new_run(tc.runs_dir, task.name, tc.run_name, tc.tag, config, summary=summary)
    if extra:
        run.update(**extra)
    if not quiet:
        print(f"run {run.id}: {run.dir}")
        _note_extension(tc)
        for line in lines:
            print(line)
    return run, config


def _prepare_run(args: argparse.Namespace, kind: TaskKind, values: dict[str, Any], default_preset: str | None, d: Any,
                 extra: dict[str, Any] | None = None):
    """The checks, then the run: a new one, or the one resumed (locked)."""
    from trainlab.engine.loop import RESUMABLE_CHANGES, check_compatible

    resuming = None
    if args.resume:
        resuming = open_for_resume(args.resume, kind.task_name, values.get("runs_dir", "runs"), values.get("tag", ""))
        if resuming is None:  # --resume auto found nothing: a new run, on the usual defaults
            values = settings_from(args, kind.sections(), default_preset)
    if resuming is not None:
        values = resume_settings(flat(resuming.config), values, RESUMABLE_CHANGES | kind.free, resuming.run.id)
    try:
        cfgs, task = checked_task(kind, values, d.world)
        if resuming is not None and resuming.ckpt is not None:
            check_compatible(resuming.ckpt, task, task.member_names)
    except BaseException:
        if resuming is not None:
            resuming.run.release()
        raise
    tc = cfgs["train"]
    if resuming is None:
        run, config = new_run_from(kind, cfgs, task, extra)
        ckpt = None
    else:
        config = {name: asdict(c) for name, c in cfgs.items()}
        run, ckpt = resuming.run, resuming.ckpt
        begin_resume(resuming)
        _note_extension(tc)
        for line in kind.describe(cfgs, task)[1]:
            print(line)
    if d.active:
        print(f"training on {d.world} processes (torchrun): each takes a slice of every batch of {tc.batch_size}")
    return task, tc, run, config, ckpt, resuming is not None


def _note_extension(tc: TrainConfig) -> None:
    if tc.max_steps and tc.lr_decay_steps and tc.max_steps > tc.lr_decay_steps:
        print(f"note: the LR schedule ends at step {tc.lr_decay_steps}; steps after it run at the final LR "
              f"({tc.min_lr_ratio:g} x --lr). Pass --lr-decay-steps to stretch it.")


def run_to_end(kind: TaskKind, values: dict[str, Any], name: str, extra: dict[str, Any] | None = None,
               echo=print):
    """The run ``name`` trained to its ``max_steps``: made if it does not exist, resumed if it
    stopped early, left alone if it is done. Returns (the run, its summary or None when there
    was nothing to do). What ``multiply compare`` builds its seeds with."""
    from trainlab.engine.distributed import Dist
    from trainlab.engine.loop import train
    from trainlab.engine.tracking import Run

    root = Path(values.get("runs_dir", "runs")) / kind.task_name / name
    values = {**values, "run_name": name}
    if (root / "run.json").is_file():
        info = Run(name, kind.task_name, root).info()
        if info.get("status") == "finished" and info.get("step") == values.get("max_steps"):
            return Run(name, kind.task_name, root), None
        args = argparse.Namespace(resume=name, task=kind.command)
    else:
        args = argparse.Namespace(resume=None, task=kind.command)
    task, tc, run, config, ckpt, restart = _prepare_run(args, kind, values, None, Dist(), extra=extra)
    return run, train(task, tc, run, config, resume=ckpt, restart=restart, echo=echo)
