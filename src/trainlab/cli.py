"""Command line: ``trainlab multiply train|ask|evaluate``.

The only module that knows every task. Bad input of any kind ends in one line,
``trainlab: error: ...``, and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from typing import Any, Sequence

from trainlab.config import (
    ConfigError,
    UsageError,
    add_flags,
    build,
    check_known_keys,
    load_preset,
    load_yaml,
    preset_names,
)
from trainlab.engine.checkpoint import CheckpointError
from trainlab.engine.loop import TrainConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _multiply_sections() -> list[tuple[str, type]]:
    from trainlab.multiply.data import MultiplyDataConfig
    from trainlab.multiply.loss import LossConfig
    from trainlab.multiply.models import Seq2SeqConfig
    from trainlab.multiply.task import MultiplyTaskConfig, TeacherForcingConfig

    return [("data", MultiplyDataConfig), ("model", Seq2SeqConfig), ("loss", LossConfig),
            ("teacher_forcing", TeacherForcingConfig), ("task", MultiplyTaskConfig), ("train", TrainConfig)]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="root folder of all runs")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random")


def build_parser() -> Parser:
    parser = Parser(prog="trainlab", description="Train small transformers reliably.")
    sub = parser.add_subparsers(dest="task", required=True, parser_class=Parser)

    mul = sub.add_parser("multiply", help="simple vs latent transformer on multiplication")
    msub = mul.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = msub.add_parser("train", help="train both models side by side")
    train.add_argument("--config", help="YAML file of settings (flags override it)")
    train.add_argument("--preset", help=f"a built-in settings file: {', '.join(preset_names())}")
    for title, cls in _multiply_sections():
        add_flags(train, cls, title)

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
    return parser


def settings_from(args: argparse.Namespace, sections: list[tuple[str, type]]) -> dict[str, Any]:
    """Defaults < preset < config file < flags, as one flat dict of field values."""
    classes = [cls for _, cls in sections]
    values: dict[str, Any] = {}
    if getattr(args, "preset", None):
        preset = load_preset(args.preset)
        check_known_keys(preset, classes, f"preset {args.preset}")
        values.update(preset)
    if getattr(args, "config", None):
        from_file = load_yaml(args.config)
        check_known_keys(from_file, classes, args.config)
        values.update(from_file)
    skip = {"task", "command", "config", "preset"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    return values


def multiply_train(args: argparse.Namespace) -> int:
    from trainlab.engine.device import resolve_device
    from trainlab.engine.loop import train
    from trainlab.engine.tracking import new_run
    from trainlab.multiply.task import MultiplyTask

    sections = _multiply_sections()
    values = settings_from(args, sections)
    cfgs = {name: build(cls, values) for name, cls in sections}
    resolve_device(cfgs["train"].device)  # fail on a missing device before creating a run
    task = MultiplyTask(cfgs["data"], cfgs["model"], cfgs["loss"], cfgs["teacher_forcing"], cfgs["task"], cfgs["train"])
    counts = task.dataset.split_counts()
    if counts["train"] == 0:
        raise ConfigError("min_digits", "this digit range leaves no training problems")
    config = {name: asdict(c) for name, c in cfgs.items()}
    tc = cfgs["train"]
    run = new_run(tc.runs_dir, task.name, tc.run_name, tc.tag, config)
    print(f"run {run.id}: {run.dir}")
    print(f"problems: {counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test "
          f"({cfgs['data'].min_digits}-{cfgs['data'].max_digits} digits, answers {cfgs['data'].answer_order})")
    summary = train(task, tc, run, config)
    return EXIT_INTERRUPTED if summary.interrupted else 0


def _load(args: argparse.Namespace):
    from trainlab.engine.device import resolve_device
    from trainlab.multiply.inference import load_members, resolve_checkpoint, trained_data_config

    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.runs_dir, args.run)
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


COMMANDS = {("multiply", "train"): multiply_train, ("multiply", "ask"): multiply_ask,
            ("multiply", "evaluate"): multiply_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[(args.task, args.command)](args)
    except (ConfigError, UsageError, CheckpointError) as e:
        sys.stderr.write(f"trainlab: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("trainlab: aborted\n")
        return EXIT_INTERRUPTED
