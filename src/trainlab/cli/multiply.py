"""``trainlab multiply train|ask|evaluate``: the simple-vs-latent comparison."""

from __future__ import annotations

import argparse

from trainlab.cli.common import Parser, common_flags, train_flags
from trainlab.cli.training import _multiply_sections, start_or_resume, task_kind
from trainlab.config import ConfigError, check_seed


def add_parser(sub) -> None:
    mul = sub.add_parser("multiply", help="simple vs latent transformer on multiplication")
    msub = mul.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = msub.add_parser("train", help="train both models side by side")
    train_flags(train, "multiply", _multiply_sections())

    ask = msub.add_parser("ask", help="ask a trained run a multiplication, e.g. 123*456")
    ask.add_argument("run", help="run id, run folder or checkpoint folder")
    ask.add_argument("problem", help="A*B")
    common_flags(ask)

    ev = msub.add_parser("evaluate", help="free-running exact-match with a 95%% confidence interval")
    ev.add_argument("run", help="run id, run folder or checkpoint folder")
    ev.add_argument("--min-digits", type=int, default=None)
    ev.add_argument("--max-digits", type=int, default=None)
    ev.add_argument("--n", type=int, default=10000, help="problems to evaluate (at most the whole split)")
    ev.add_argument("--split", default="test", help="train|val|test")
    common_flags(ev)


def multiply_train(args: argparse.Namespace) -> int:
    return start_or_resume(args, task_kind("multiply"))


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
    check_seed("seed", args.seed)
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
