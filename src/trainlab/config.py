"""Dataclass configs, their command-line flags and YAML files.

Every config is a dataclass checked in ``__post_init__``; a bad value raises
``ConfigError`` naming the flag. Flags are generated from the fields (``d_model``
becomes ``--d-model``) so a field, its flag and its config-file key are one name.
Precedence: dataclass default < preset (``--preset``, or the task's default one) <
config file (``--config``) < flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import stat
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting; the message names the flag, e.g. ``--d-model: must be positive``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{flag_name(field)}: {message}")


class UsageError(Exception):
    """Bad input that is not a single setting (missing run, unreadable file, ...)."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # evaluated once per class: the string annotations (``from __future__ import annotations``)
    # cost about a millisecond a call, and building the parser asked once per field
    return typing.get_type_hints(cls)


def field_type(cls: type, f: dataclasses.Field) -> Any:
    """The type a field holds, ``X | None`` read as ``X``."""
    t = _type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return t


def _parse_optional_int(text: str) -> int | None:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'none', got {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _parse_optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "null"):
        return None
    return _parse_float(text)


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of ``cls``; defaults are SUPPRESSed so only given flags show up."""
    group = parser.add_argument_group(title)
    for f in cli_fields(cls):
        t = field_type(cls, f)
        # argparse formats help with %: a literal one ("gained 0-3%") must be doubled
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", "").replace("%", "%%")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if t is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.default is None and t is int:
            kwargs["type"] = _parse_optional_int
            kwargs["metavar"] = "N|none"
        elif f.default is None and t is float:  # "none" takes back a preset's value
            kwargs["type"] = _parse_optional_float
            kwargs["metavar"] = "X|none"
        elif t is int:
            kwargs["type"] = _parse_int
        elif t is float:
            kwargs["type"] = _parse_float
        else:
            kwargs["type"] = t
        group.add_argument(flag_name(f.name), dest=f.name, **kwargs)


def build(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` from the keys of ``values`` it owns (others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            kwargs[f.name] = _coerce(cls, f, kwargs[f.name])
    return cls(**kwargs)


def _coerce(cls: type, f: dataclasses.Field, value: Any) -> Any:
    t = field_type(cls, f)
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f.name, "must be set")
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f.name, f"must be true or false, got {value!r}")
    if t in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f.name, f"must be {'an integer' if t is int else 'a number'}, got {_shown(value)}")
        if not math.isfinite(value):  # nan and inf pass every range check written as comparisons
            raise ConfigError(f.name, f"must be a finite number, got {value!r}")
        if t is int and not float(value).is_integer():
            raise ConfigError(f.name, f"must be an integer, got {value!r}")
        return t(value)
    if t is str:
        return str(value)
    return value


def check_known_keys(values: dict[str, Any], classes: list[type], source: str) -> None:
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{source}: unknown setting {unknown[0]!r}")


MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few hundred bytes; anything near this is not one


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_small_file(path: str | Path, what: str, limit: int = MAX_SETTINGS_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes. A FIFO, a device such as
    /dev/zero or a folder is refused before it is opened, so nothing can hang or fill memory."""
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {p} is not a regular file")
        if st.st_size > limit:
            raise UsageError(f"{what} {p} is {st.st_size:,} bytes; at most {limit:,} are read")
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {p} is over {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {p} is not UTF-8 text") from None


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a settings file needs none, and aliases nested
    in aliases (a 'billion laughs') expand exponentially when the values are used."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in settings files",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    """Safe YAML without aliases; errors as one bounded line naming ``source``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"{source} is not valid YAML{where}: {first[:120]}") from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply") from None


def flat_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A saved ``config.json`` ({section: {field: value}}) as one mapping {field: value}."""
    return {k: v for section in config.values() if isinstance(section, dict) for k, v in section.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = parse_yaml(read_small_file(p, "config file"), f"config file {p}") or {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# what `<task> train` starts from when no preset is given (and a run is not resumed)
DEFAULT_PRESETS = {"chat": "chatgot-14m"}


def preset_names(task: str) -> list[str]:
    folder = resources.files("trainlab.presets") / task
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def load_preset(task: str, name: str) -> dict[str, Any]:
    if name not in preset_names(task):
        raise UsageError(f"--preset: unknown preset {name!r} (have: {', '.join(preset_names(task))})")
    with resources.as_file(resources.files("trainlab.presets") / task / f"{name}.yaml") as p:
        return load_yaml(p)


def finite(field: str, value: float | int) -> None:
    """nan and inf compare False with everything, so every range check below starts here."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value}")


def positive(field: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is not None:
        finite(field, value)
    if value is None or value <= 0:
        raise ConfigError(field, f"must be positive, got {value}")


def non_negative(field: str, value: float | int) -> None:
    finite(field, value)
    if value < 0:
        raise ConfigError(field, f"must not be negative, got {value}")


MAX_SEED = 2**63 - 1


def check_seed(field: str, value: int) -> None:
    """A seed every generator here takes (numpy's, torch's and Python's)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(field, f"must be a whole number from 0 to 2**63-1, got {_shown(value)}")


def in_range(field: str, value: float, low: float, high: float, low_open: bool = False,
             high_open: bool = False) -> None:
    """``value`` within the interval, e.g. ``in_range("dropout", p, 0, 1, high_open=True)`` is [0, 1)."""
    finite(field, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(field, f"must be in {interval}, got {value}")


def check_heads(d_model: int, nhead: int) -> None:
    if d_model % nhead:
        raise ConfigError("d_model", f"must be divisible by --nhead (got {d_model} and {nhead})")


def one_of(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(field, f"must be one of {'|'.join(choices)}, got {value!r}")
