"""``trainlab chat train|generate|repl``: ChatGoT."""

from __future__ import annotations

import argparse
import sys

from trainlab.cli.common import Parser, train_flags, warn
from trainlab.cli.training import _chat_sections, start_or_resume, task_kind
from trainlab.config import add_flags, build


def add_parser(sub) -> None:
    from trainlab.chat.sampling import SamplingConfig

    chat = sub.add_parser("chat", help="ChatGoT: a character-level GPT on any text")
    csub = chat.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = csub.add_parser("train", help="train on a UTF-8 text file (--text FILE)")
    train_flags(train, "chat", _chat_sections())
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


def chat_train(args: argparse.Namespace) -> int:
    return start_or_resume(args, task_kind("chat"))


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
    from trainlab.engine.stopping import leave_on_signals

    leave_on_signals()  # SIGTERM and SIGHUP leave as Ctrl+C does, with one line
    cm, sampling, generator = _load_chat(args)
    ids = encode_warn(cm.vocab, args.prompt, warn)
    sys.stdout.write(cm.vocab.decode(ids))  # the prompt as the model reads it
    for piece in complete(cm, ids, sampling, generator):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def chat_repl(args: argparse.Namespace) -> int:
    from trainlab.chat.repl import default_dialogue, repl
    from trainlab.engine.stopping import leave_on_signals

    leave_on_signals()  # SIGTERM and SIGHUP leave as Ctrl+C does, with one line
    cm, sampling, generator = _load_chat(args)
    dialogue = default_dialogue(cm.dialogue, args.style, args.user_name, args.bot_name)
    return repl(cm, dialogue, sampling, generator, warn=warn)


COMMANDS = {("chat", "train"): chat_train, ("chat", "generate"): chat_generate, ("chat", "repl"): chat_repl}
