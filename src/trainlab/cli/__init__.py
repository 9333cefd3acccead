"""Command line: ``trainlab multiply train|ask|evaluate|compare|budgets``,
``trainlab chat train|generate|repl|serve|export``, ``trainlab runs list|clean|rm``,
``trainlab tune multiply|chat|show`` (each group's ``COMMANDS`` is the list the parser is built from).

Argv in, calls of the run path (``trainlab.runs``) and of the tasks' own functions, lines
out: one module per command group (multiply.py, chat.py, runs.py, tune.py) and what all of
them share (common.py). Building the parser loads no PyTorch, so ``--help`` and usage
errors answer at once. Bad input of any kind ends in one line,
``trainlab: error: ...``, and exit status 2, before anything is written.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from typing import Sequence

from trainlab.cli import chat, multiply, runs, tune
from trainlab.cli.common import EXIT_FAILED, EXIT_USAGE, Parser, one_line
from trainlab.config import ConfigError, UsageError
from trainlab.engine.errors import CheckpointError, TrainingError

__all__ = ["build_parser", "main"]

GROUPS = (multiply, chat, runs, tune)
COMMANDS = {key: command for group in GROUPS for key, command in group.COMMANDS.items()}
# the commands that never need PyTorch: they answer without paying for its import
WITHOUT_TORCH = {("runs", "list"), ("runs", "clean"), ("runs", "rm"), ("tune", "show")}


def _abort_at_start(signum, frame) -> None:
    os.write(2, b"trainlab: aborted\n")
    os._exit(130)


def load_torch() -> None:
    """Import PyTorch with Ctrl+C ending the process in one line (exit 130). A Ctrl+C in the
    second or two the import takes would interrupt an extension module half-way through its
    import and end in a traceback (sometimes an ImportError, not even a KeyboardInterrupt);
    nothing has been written yet, so leaving at once is safe."""
    guard = threading.current_thread() is threading.main_thread()  # signal handlers are the main thread's
    previous = signal.signal(signal.SIGINT, _abort_at_start) if guard else None
    try:
        import torch  # noqa: F401
    finally:
        if guard:
            signal.signal(signal.SIGINT, previous)


def build_parser() -> Parser:
    parser = Parser(prog="trainlab", description="Train small transformers reliably.")
    sub = parser.add_subparsers(dest="task", required=True, parser_class=Parser)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def _problem_not_flag(argv: list[str]) -> list[str]:
    """``ask RUN -3*4``: argparse would take ``-3*4`` for an unknown flag and say the problem is
    missing; passed after ``--`` it reaches ``parse_problem``, which says what is wrong with it."""
    if argv[:2] != ["multiply", "ask"] or "--" in argv:
        return argv
    for i, a in enumerate(argv[2:], start=2):
        if re.match(r"-\s*[0-9]", a):
            return argv[:i] + argv[i + 1:] + ["--", a]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_problem_not_flag(argv))
    except SystemExit as e:  # a usage error, already printed as one line, is a return value too
        if e.code in (0, None):  # --help
            raise
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.argv = argv  # `tune --workers N` starts N copies of its own command
    if (args.task, args.command) not in WITHOUT_TORCH:
        load_torch()
    try:
        return COMMANDS[(args.task, args.command)](args)
    except (ConfigError, UsageError, CheckpointError) as e:
        sys.stderr.write(f"trainlab: error: {one_line(e)}\n")
        return EXIT_USAGE
    except TrainingError as e:  # the run is marked failed; its checkpoints are as they were
        sys.stderr.write(f"trainlab: error: {one_line(e)}\n")
        return EXIT_FAILED
    except OSError as e:  # a full disk, a folder made read-only mid-run: the run is marked failed
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        sys.stderr.write(f"trainlab: error: {e.strerror or e.__class__.__name__}{where}\n")
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # a second stop signal, or Ctrl+C outside training
        sys.stderr.write("trainlab: aborted\n")
        return 128 + getattr(e, "signum", 2)
