"""The command-line reference as Markdown, generated from the parsers themselves, so the docs
cannot drift from the flags: ``docs/hooks.py`` writes it into the site at every build."""

from __future__ import annotations

import argparse
import os
from typing import Iterator

from trainlab.cli import build_parser

WIDTH = 100  # help text is wrapped at this many columns, whatever the terminal that builds the docs


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                              argparse.ArgumentParser]]:
    """(words after ``trainlab``, parser) for the parser and every sub-command under it, in order."""
    yield path, parser
    for action in parser._actions:  # argparse keeps sub-parsers here and has no public way to list them
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def reference_markdown() -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse reads the width when it formats
    try:
        parts = ["# Command-line reference", "",
                 "Generated from trainlab's own parsers when the docs are built "
                 "(`src/trainlab/cli/reference.py`): every command's `--help`, as the terminal shows it.", ""]
        for path, parser in commands(build_parser()):
            name = " ".join(("trainlab", *path))
            parts += [f"## `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
        return "\n".join(parts)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
