"""What every command shares: the one-line error parser, settings from presets, config files
and flags, and the flags of every train command."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from trainlab.config import add_flags, check_known_keys, flag_name, load_preset, load_yaml, preset_names

EXIT_FAILED = 1
EXIT_USAGE = 2

# what `train` starts from when no --preset is given (and a run is not resumed)
DEFAULT_PRESETS = {"chat": "chatgot-14m"}


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def warn(line: str) -> None:
    sys.stderr.write(line + "\n")


def common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--best", action="store_true", help="use the run's best checkpoint (by val exact-match), "
                                                      "not its newest")
    p.add_argument("--runs-dir", default="runs", help="root folder of all runs")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--seed", type=int, default=0, help="seed for anything random")


def train_flags(p: argparse.ArgumentParser, task: str, sections: list[tuple[str, type]], resume: bool = True) -> None:
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    default = f" (default {DEFAULT_PRESETS[task]})" if task in DEFAULT_PRESETS else ""
    p.add_argument("--preset", help=f"a built-in settings file: {', '.join(preset_names(task))}{default}")
    if resume:
        p.add_argument("--resume", metavar="RUN|auto",
                       help="continue a run exactly where it stopped (its id or folder); auto: the newest unfinished "
                            "run of this task with the same --tag, or a new run if there is none")
    for title, cls in sections:
        add_flags(p, cls, title)


def settings_from(args: argparse.Namespace, sections: list[tuple[str, type]], default_preset: str | None = None,
                  task: str | None = None) -> dict[str, Any]:
    """Defaults < preset (``--preset``, else ``default_preset``) < config file < flags, as one
    flat dict of field values. ``task``: whose presets (default ``args.task``)."""
    classes = [cls for _, cls in sections]
    values: dict[str, Any] = {}
    preset_name = getattr(args, "preset", None) or default_preset
    if preset_name:
        preset = load_preset(task or args.task, preset_name)
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
    warn = warn or globals()['warn']
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
