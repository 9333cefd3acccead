"""Command line: ``trainlab multiply train|ask|evaluate``, ``trainlab chat train|generate|repl``,
``trainlab runs list|clean|rm``.

The only module that knows every task. Bad input of any kind ends in one line,
``trainlab: error: ...``, and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from trainlab.config import (
    ConfigError,
    UsageError,
    add_flags,
    build,
    check_known_keys,
    flag_name,
    load_preset,
    load_yaml,
    preset_names,
)
from trainlab.engine.checkpoint import CheckpointError
from trainlab.engine.loop import TrainConfig, TrainingError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _warn(line: str) -> None:
    sys.stderr.write(line + "\n")


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


# what `train` starts from when no --preset is given (and a run is not resumed)
DEFAULT_PRESETS = {"chat": "chatgot-14m"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--best", action="store_true", help="use the run's best checkpoint (by val exact-match), "
                                                      "not its newest")
    p.add_argument("--runs-dir", default="runs", help="root folder of all runs")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random")


def _train_flags(p: argparse.ArgumentParser, task: str, sections: list[tuple[str, type]]) -> None:
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    default = f" (default {DEFAULT_PRESETS[task]})" if task in DEFAULT_PRESETS else ""
    p.add_argument("--preset", help=f"a built-in settings file: {', '.join(preset_names(task))}{default}")
    p.add_argument("--resume", metavar="RUN|auto",
                   help="continue a run exactly where it stopped (its id or folder); auto: the newest unfinished "
                        "run of this task with the same --tag, or a new run if there is none")
    for title, cls in sections:
        add_flags(p, cls, title)


def _chat_parser(sub) -> None:
    from trainlab.chat.sampling import SamplingConfig

    chat = sub.add_parser("chat", help="ChatGoT: a character-level GPT on any text")
    csub = chat.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = csub.add_parser("train", help="train on a UTF-8 text file (--text FILE)")
    _train_flags(train, "chat", _chat_sections())
    gen = csub.add_parser("generate", help="print the prompt and a completion")
    gen.add_argument("--prompt", default="", help="text to continue (default: start from a new line)")
    repl = csub.add_parser("repl", help="chat with a trained model in the style of its corpus")
    repl.add_argument("--user-name", help="your speaker name (default: the corpus's second most frequent)")
    repl.add_argument("--bot-name", help="the model's speaker name (default: the corpus's most frequent)")
    repl.add_argument("--style", choices=("inline", "block"),
                      help="turns as 'NAME: line' or 'NAME:' then the speech (default: the corpus's)")
    for p in (gen, repl):
        p.add_argument("--checkpoint", required=True, metavar="RUN_OR_PATH",
                       help="run id, run folder or checkpoint folder")
        p.add_argument("--best", action="store_true", help="use the run's best checkpoint (lowest val loss)")
        p.add_argument("--runs-dir", default="runs", help="root folder of all runs")
        p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
        add_flags(p, SamplingConfig, "sampling (in this order: repetition penalty, temperature, top-k, top-p)")


def _runs_parser(sub) -> None:
    runs = sub.add_parser("runs", help="list and clean up runs")
    rsub = runs.add_subparsers(dest="command", required=True, parser_class=Parser)
    ls = rsub.add_parser("list", help="every run in the runs index")
    ls.add_argument("--task", dest="only_task", help="only this task")
    ls.add_argument("--tag", help="only runs with this tag")
    clean = rsub.add_parser("clean", help="remove runs tagged 'test' (never untagged runs)")
    clean.add_argument("--tests", action="store_true", help="required: remove runs tagged 'test'")
    clean.add_argument("--older-than", metavar="AGE", help="only runs untouched for AGE (e.g. 90m, 12h, 7d, 2w)")
    clean.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    rm = rsub.add_parser("rm", help="remove runs by id: events, checkpoints and index rows")
    rm.add_argument("ids", nargs="+", metavar="ID", help="run id, task/id, or run folder inside the runs folder")
    rm.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    for p in (ls, clean, rm):
        p.add_argument("--runs-dir", default="runs", help="root folder of all runs")


def build_parser() -> Parser:
    parser = Parser(prog="trainlab", description="Train small transformers reliably.")
    sub = parser.add_subparsers(dest="task", required=True, parser_class=Parser)

    mul = sub.add_parser("multiply", help="simple vs latent transformer on multiplication")
    msub = mul.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = msub.add_parser("train", help="train both models side by side")
    _train_flags(train, "multiply", _multiply_sections())

    ask = msub.add_parser("ask", help="ask a trained run a multiplication, e.g. 123*456")
    ask.add_argument("run", help="run id, run folder or checkpoint folder")
    ask.add_argument("problem", help="A*B")
    _common(ask)

    ev = msub.add_parser("evaluate", help="free-running exact-match with a 95%% confidence interval")
    ev.add_argument("run", help="run id, run folder or checkpoint folder")
    ev.add_argument("--min-digits", type=int, default=None)
    ev.add_argument("--max-digits", type=int, default=None)
    ev.add_argument("--n", type=int, default=10000, help="problems to evaluate (at most the whole split)")
    ev.add_argument("--split", default="test", help="train|val|test")
    _common(ev)
    _chat_parser(sub)
    _runs_parser(sub)
    return parser


def settings_from(args: argparse.Namespace, sections: list[tuple[str, type]], default_preset: str | None = None
                  ) -> dict[str, Any]:
    """Defaults < preset (``--preset``, else ``default_preset``) < config file < flags, as one
    flat dict of field values."""
    classes = [cls for _, cls in sections]
    values: dict[str, Any] = {}
    preset_name = getattr(args, "preset", None) or default_preset
    if preset_name:
        preset = load_preset(args.task, preset_name)
        check_known_keys(preset, classes, f"preset {preset_name}")
        values.update(preset)
    if getattr(args, "config", None):
        from_file = load_yaml(args.config)
        check_known_keys(from_file, classes, args.config)
        values.update(from_file)
    skip = {"task", "command", "config", "preset", "resume"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    return values


def resume_settings(run_values: dict[str, Any], given: dict[str, Any], free: frozenset[str] | set[str],
                    run_id: str, warn=None) -> dict[str, Any]:
    """The settings of a resumed run: the run's own, with ``given`` (flags, file, preset)
    applied only where ``free`` allows. Every other given value that differs is reported
    in one line naming both values, and the run's value is kept."""
    warn = warn or _warn
    values = dict(run_values)
    for key, new in given.items():
        if key not in values:
            continue
        old = values[key]
        if new == old:
            continue
        if key in free:
            values[key] = new
            print(f"{flag_name(key)}: {old} -> {new} from here on")
        else:
            shown = repr(old) if isinstance(old, str) else old
            warn(f"warning: {flag_name(key)} {new} ignored: run {run_id} was made with {shown}, "
                 f"and a resumed run keeps its own")
    return values


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """{section: {field: value}} -> {field: value}."""
    return {k: v for section in config.values() if isinstance(section, dict) for k, v in section.items()}


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


def start_or_resume(args: argparse.Namespace, sections: list[tuple[str, type]], task_name: str,
                    free: frozenset[str], make_task: Callable[[dict[str, Any]], Any],
                    describe: Callable[[dict[str, Any], Any], tuple[str, list[str]]]) -> int:
    """Every task's ``train`` command: a new run, or ``--resume`` of an existing one.

    ``make_task(cfgs)`` builds the task from the section configs (and may reject them, or
    complete them with what only the data knows, such as a vocabulary size);
    ``describe(cfgs, task)`` gives the one-line settings summary for the runs index and
    lines to print before training. All checks happen before anything is written.

    Under torchrun, rank 0 does all of this and tells the other ranks which run (and
    checkpoint) to train with which settings; they only read."""
    from trainlab.engine import distributed

    default_preset = DEFAULT_PRESETS.get(args.task)
    # a resumed run has its own settings: the default preset must not read as flags against them
    values = settings_from(args, sections, None if args.resume else default_preset)
    d = distributed.setup(str(values.get("device", "auto")))
    try:
        if not d.main:
            return _follow_rank_zero(d, sections, make_task)
        try:
            task, tc, run, config, ckpt, restart = _prepare_run(args, sections, task_name, free, make_task, describe,
                                                                values, default_preset, d)
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

    result = train(task, tc, run, config, resume=ckpt, restart=restart)
    distributed.barrier(distributed.current())
    return EXIT_INTERRUPTED if result.interrupted else 0


def _follow_rank_zero(d: Any, sections: list[tuple[str, type]], make_task: Callable[[dict[str, Any]], Any]) -> int:
    """A rank past 0: train the run rank 0 prepared, with the settings it resolved."""
    from trainlab.engine import distributed
    from trainlab.engine.checkpoint import Checkpoint
    from trainlab.engine.tracking import Run

    plan = distributed.broadcast(None, d)
    if plan is None:  # rank 0 refused the settings and says why
        return EXIT_USAGE
    values = flat(plan["config"])
    cfgs = {name: build(cls, values) for name, cls in sections}
    task = make_task(cfgs)
    run_id, task_name, run_dir = plan["run"]
    ckpt = Checkpoint(Path(plan["checkpoint"]), task_name) if plan["checkpoint"] else None
    return _train_run(task, cfgs["train"], Run(run_id, task_name, Path(run_dir)), plan["config"], ckpt,
                      plan["restart"])


def _prepare_run(args: argparse.Namespace, sections: list[tuple[str, type]], task_name: str, free: frozenset[str],
                 make_task: Callable[[dict[str, Any]], Any], describe: Callable[[dict[str, Any], Any], tuple[str, list[str]]],
                 values: dict[str, Any], default_preset: str | None, d: Any):
    """The checks, then the run: a new one, or the one resumed (locked)."""
    from trainlab.engine.device import resolve_device
    from trainlab.engine.loop import RESUMABLE_CHANGES, check_compatible
    from trainlab.engine.precision import resolve_precision, slow_precision_warning
    from trainlab.engine.tracking import new_run

    resuming = None
    if args.resume:
        resuming = open_for_resume(args.resume, task_name, values.get("runs_dir", "runs"), values.get("tag", ""))
        if resuming is None:  # --resume auto found nothing: a new run, on the usual defaults
            values = settings_from(args, sections, default_preset)
    if resuming is not None:
        values = resume_settings(flat(resuming.config), values, RESUMABLE_CHANGES | free, resuming.run.id)
    try:
        cfgs = {name: build(cls, values) for name, cls in sections}
        # fail on a missing device, or a precision it lacks, before creating a run
        device = resolve_device(cfgs["train"].device)
        resolve_precision(cfgs["train"].precision, device)
        slow = slow_precision_warning(cfgs["train"].precision, device)
        if slow:
            _warn(slow)
        if cfgs["train"].batch_size < d.world:
            raise ConfigError("batch_size", f"must be at least the number of processes ({d.world}), "
                                            f"got {cfgs['train'].batch_size}")
        task = make_task(cfgs)
        if resuming is not None and resuming.ckpt is not None:
            check_compatible(resuming.ckpt, task, task.member_names)
    except BaseException:
        if resuming is not None:
            resuming.run.release()
        raise
    config = {name: asdict(c) for name, c in cfgs.items()}
    tc = cfgs["train"]
    summary, lines = describe(cfgs, task)
    if resuming is None:
        run, ckpt = new_run(tc.runs_dir, task.name, tc.run_name, tc.tag, config, summary=summary), None
        print(f"run {run.id}: {run.dir}")
    else:
        run, ckpt = resuming.run, resuming.ckpt
        begin_resume(resuming)
    _note_extension(tc)
    for line in lines:
        print(line)
    if d.active:
        print(f"training on {d.world} processes (torchrun): each takes a slice of every batch of {tc.batch_size}")
    return task, tc, run, config, ckpt, resuming is not None


def multiply_train(args: argparse.Namespace) -> int:
    from trainlab.multiply.task import RESUMABLE_TASK_CHANGES, TASK_NAME, MultiplyTask

    def make_task(cfgs: dict[str, Any]) -> MultiplyTask:
        task = MultiplyTask(cfgs["data"], cfgs["model"], cfgs["loss"], cfgs["teacher_forcing"], cfgs["task"],
                            cfgs["train"])
        if task.dataset.split_counts()["train"] == 0:
            raise ConfigError("min_digits", "this digit range leaves no training problems")
        return task

    def describe(cfgs: dict[str, Any], task: MultiplyTask) -> tuple[str, list[str]]:
        d, mc, tc = cfgs["data"], cfgs["model"], cfgs["train"]
        counts = task.dataset.split_counts()
        layers = f"{mc.num_layers}" if mc.n_dec == mc.num_layers else f"{mc.num_layers}+{mc.n_dec}"
        summary = (f"{d.min_digits}-{d.max_digits} digits, d_model {mc.d_model}, {layers} layers, "
                   f"{mc.num_latent} latents, batch {tc.batch_size}, members {cfgs['task'].members}")
        return summary, [f"problems: {counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test "
                         f"({d.min_digits}-{d.max_digits} digits, answers {d.answer_order})"]

    return start_or_resume(args, _multiply_sections(), TASK_NAME, RESUMABLE_TASK_CHANGES, make_task, describe)


def chat_train(args: argparse.Namespace) -> int:
    from trainlab.chat.task import RESUMABLE_TASK_CHANGES, TASK_NAME, ChatTask, make_chat_task

    def describe(cfgs: dict[str, Any], task: ChatTask) -> tuple[str, list[str]]:
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

    return start_or_resume(args, _chat_sections(), TASK_NAME, RESUMABLE_TASK_CHANGES, make_chat_task, describe)


def _load_chat(args: argparse.Namespace):
    from trainlab.chat.repl import load_chat_model
    from trainlab.chat.sampling import SamplingConfig, make_generator
    from trainlab.chat.task import TASK_NAME
    from trainlab.engine.device import resolve_device
    from trainlab.engine.tracking import resolve_checkpoint

    sampling = build(SamplingConfig, vars(args))
    device = resolve_device(args.device)
    cm = load_chat_model(resolve_checkpoint(args.runs_dir, TASK_NAME, args.checkpoint, best=args.best), device)
    return cm, sampling, make_generator(sampling.seed)


def chat_generate(args: argparse.Namespace) -> int:
    from trainlab.chat.repl import complete, encode_warn

    cm, sampling, generator = _load_chat(args)
    ids = encode_warn(cm.vocab, args.prompt, _warn)
    sys.stdout.write(cm.vocab.decode(ids))  # the prompt as the model reads it
    for piece in complete(cm, ids, sampling, generator):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def chat_repl(args: argparse.Namespace) -> int:
    from trainlab.chat.repl import default_dialogue, repl

    cm, sampling, generator = _load_chat(args)
    dialogue = default_dialogue(cm.dialogue, args.style, args.user_name, args.bot_name)
    return repl(cm, dialogue, sampling, generator, warn=_warn)


def _note_extension(tc: TrainConfig) -> None:
    if tc.max_steps and tc.lr_decay_steps and tc.max_steps > tc.lr_decay_steps:
        print(f"note: the LR schedule ends at step {tc.lr_decay_steps}; steps after it run at the final LR "
              f"({tc.min_lr_ratio:g} x --lr). Pass --lr-decay-steps to stretch it.")


def _load(args: argparse.Namespace):
    from trainlab.engine.device import resolve_device
    from trainlab.engine.tracking import resolve_checkpoint
    from trainlab.multiply.inference import load_members, trained_data_config
    from trainlab.multiply.task import TASK_NAME

    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.runs_dir, TASK_NAME, args.run, best=args.best)
    return ckpt, load_members(ckpt, device), trained_data_config(ckpt)


def multiply_ask(args: argparse.Namespace) -> int:
    from trainlab.multiply.inference import answer, evaluation_dataset, parse_problem

    ckpt, models, trained = _load(args)
    a, b = parse_problem(args.problem, trained.max_digits)
    dataset = evaluation_dataset(trained, 1, trained.max_digits)
    truth = a * b
    print(f"{a}*{b} = {truth}  (checkpoint step {ckpt.step})")
    for name, got in answer(models, dataset, a, b).items():
        verdict = "right" if got == truth else "wrong"
        print(f"  {name:>8}: {'(no number)' if got is None else got}  {verdict}")
    if not (trained.min_digits <= len(str(a)) <= trained.max_digits and
            trained.min_digits <= len(str(b)) <= trained.max_digits):
        print(f"  note: outside the trained range of {trained.min_digits}-{trained.max_digits} digits")
    return 0


def multiply_evaluate(args: argparse.Namespace) -> int:
    from trainlab.multiply.data import SPLITS
    from trainlab.multiply.inference import evaluate_members, evaluation_dataset

    if args.split not in SPLITS:
        raise ConfigError("split", f"must be one of {'|'.join(SPLITS)}, got {args.split!r}")
    if args.n <= 0:
        raise ConfigError("n", f"must be positive, got {args.n}")
    ckpt, models, trained = _load(args)
    dataset = evaluation_dataset(trained, args.min_digits, args.max_digits)
    results = evaluate_members(models, dataset, args.split, args.n, args.seed)
    cfg = dataset.cfg
    print(f"checkpoint step {ckpt.step}; {args.split} split, digits {cfg.min_digits}-{cfg.max_digits}, "
          f"free-running greedy decoding")
    for name, r in results.items():
        print(f"  {name:>8}: exact-match {r['exact_match']:.2%} (95% CI {r['ci_low']:.2%}-{r['ci_high']:.2%}, "
              f"{r['correct']}/{r['n']}), digit accuracy {r['digit_accuracy']:.2%}")
    return 0


def runs_list(args: argparse.Namespace) -> int:
    from trainlab.engine.tracking import Run, RunsIndex, scan_runs

    index = RunsIndex(args.runs_dir)
    rows = index.rows()
    on_disk = {r.key for r in scan_runs(args.runs_dir)}
    if on_disk != set(rows):  # a run folder without a row, or a row without a folder
        rows = index.rebuild()
    shown = [r for r in rows.values() if (not args.only_task or r["task"] == args.only_task)
             and (args.tag is None or r.get("tag", "") == args.tag)]
    if not shown:
        print(f"no runs in {args.runs_dir}")
        return 0
    table = [("id", "task", "status", "step", "created", "tag", "settings")]
    for r in sorted(shown, key=lambda r: r.get("created", "")):
        run = Run(r["id"], r["task"], Path(args.runs_dir) / r["dir"])
        steps = f"{r.get('step', 0)}/{r['max_steps']}" if r.get("max_steps") else str(r.get("step", 0))
        table.append((r["id"], r["task"], run.effective_status(r), steps, r.get("created", "")[:19], r.get("tag", ""),
                      r.get("summary", "")))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    return 0


def runs_clean(args: argparse.Namespace) -> int:
    from trainlab.engine.tracking import clean_test_runs, parse_age

    if not args.tests:
        raise UsageError("runs clean: pass --tests; it only ever removes runs tagged 'test' "
                         "(remove any other run by id with `trainlab runs rm ID`)")
    age = parse_age(args.older_than) if args.older_than else None
    removed = clean_test_runs(args.runs_dir, age, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for run in removed:
        print(f"{verb} {run.key}")
    print(f"{verb} {len(removed)} test run{'s' if len(removed) != 1 else ''}")
    return 0


def runs_rm(args: argparse.Namespace) -> int:
    from trainlab.engine.tracking import find_run, remove_runs

    runs = [find_run(args.runs_dir, None, ref) for ref in args.ids]
    remove_runs(args.runs_dir, runs, dry_run=args.dry_run)
    for run in runs:
        print(f"{'would remove' if args.dry_run else 'removed'} {run.key}")
    return 0


COMMANDS = {("multiply", "train"): multiply_train, ("multiply", "ask"): multiply_ask,
            ("multiply", "evaluate"): multiply_evaluate, ("chat", "train"): chat_train,
            ("chat", "generate"): chat_generate, ("chat", "repl"): chat_repl, ("runs", "list"): runs_list, ("runs", "clean"): runs_clean,
            ("runs", "rm"): runs_rm}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[(args.task, args.command)](args)
    except (ConfigError, UsageError, CheckpointError) as e:
        sys.stderr.write(f"trainlab: error: {e}\n")
        return EXIT_USAGE
    except TrainingError as e:  # the run is marked failed; its checkpoints are as they were
        sys.stderr.write(f"trainlab: error: {e}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("trainlab: aborted\n")
        return EXIT_INTERRUPTED
