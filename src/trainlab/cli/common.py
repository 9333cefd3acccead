"""What every command shares: the one-line error parser, the flags of every train command,
and the settings a command line gives (``trainlab.runs`` merges them with presets and files)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainlab import runs
from trainlab.config import DEFAULT_PRESETS, add_flags, preset_names

EXIT_FAILED = 1
EXIT_USAGE = 2


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--best", action="store_true", help="use the run's best checkpoint (by val exact-match), "
                                                      "not its newest")
    p.add_argument("--runs-dir", default="runs", help="root folder of all runs")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random")


def train_flags(p: argparse.ArgumentParser, task: str, sections: list[tuple[str, type]], resume: bool = True) -> None:
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    default = f" (default {DEFAULT_PRESETS[task]})" if task in DEFAULT_PRESETS else ""
    names = ", ".join(preset_names(task))
    auto = ("; auto (with --minutes): the one that trains best in that time on this machine, chosen by timing a "
            "few steps of each") if task == "chat" else ""
    p.add_argument("--preset", help=f"a built-in settings file: {names}{default}{auto}")
    if resume:
        p.add_argument("--resume", metavar="RUN|auto",
                       help="continue a run exactly where it stopped (its id or folder); auto: the newest unfinished "
                            "run of this task with the same --tag, or a new run if there is none")
    for title, cls in sections:
        add_flags(p, cls, title)


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a command line gave: every parsed value but the command's own words
    (train flags are SUPPRESSed by default, so only those given are here)."""
    skip = {"task", "command", "config", "preset", "resume", "argv"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def settings_from(args: argparse.Namespace, command: str, default_preset: bool = True) -> dict[str, Any]:
    """Defaults < preset (``--preset``, else the task's default one) < ``--config`` < flags."""
    return runs.settings(command, getattr(args, "preset", None), getattr(args, "config", None), flags_of(args),
                         default_preset=default_preset)


def without_budget(args: argparse.Namespace, values: dict[str, Any], instead: str) -> dict[str, Any]:
    """The settings of a command with a budget of its own (``tune``, ``multiply compare``):
    a preset's ``minutes`` left out (as if absent, so the ids of studies and comparisons made
    before presets had budgets stay the same); ``--minutes`` on its command line refused."""
    from trainlab.config import ConfigError

    if getattr(args, "minutes", None) is not None:
        raise ConfigError("minutes", f"is a train command's budget; {instead}")
    return {k: v for k, v in values.items() if k != "minutes"}


def train_command(args: argparse.Namespace, command: str) -> int:
    """Every task's ``train``: a new run, or ``--resume`` of an existing one (whose own settings
    win: the default preset is not read against them), trained to its end; the exit status."""
    import time

    from trainlab.engine.budget import process_age
    from trainlab.engine.stopping import exit_status

    started = time.monotonic() - process_age()  # a --minutes budget counts from the command's start
    flags = flags_of(args)
    extra: dict[str, Any] = {}

    def preset() -> str | None:
        """``--preset``, with ``auto`` resolved by timing this machine (only for a new run)."""
        if args.preset != "auto":
            return args.preset
        from trainlab.auto import choose

        name, record = choose(command, args.config, flags, started)
        extra.update(record)
        return name

    # a resumed run keeps its own recipe: auto has nothing to choose (and times nothing)
    values = runs.settings(command, None if args.preset == "auto" and args.resume else preset(), args.config,
                           flags, default_preset=not args.resume)
    fresh = (lambda: runs.settings(command, preset(), args.config, flags)) if args.resume else None
    summary = runs.train(command, values, resume=args.resume, fresh=fresh, started=started, extra=extra)
    # the interpreter's final collection of a run's objects took about a second at exit, time a
    # --minutes budget would not see: frozen objects are left to the process's end instead
    import gc

    gc.freeze()
    if summary is None:  # a rank past 0 whose rank 0 refused the settings (and said why)
        return EXIT_USAGE
    return exit_status(summary.stop_signal) if summary.interrupted else 0
