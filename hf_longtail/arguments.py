"""Command-line options from a YAML/JSON file plus flags, typed and range-checked up front.

``scripts/train.py`` takes ``[CONFIG.yaml] [--flag value ...]`` (the file anywhere among the
flags; the flags override it). ``HfArgumentParser`` converts flags by type, but values from a
file become parser defaults that no one converts or checks, so a YAML slip would surface hours
later, or never (a wrong type silently accepted). :func:`read_config_file` therefore checks each
value against its field's type hint and names the option:

- numbers for ``int`` / ``float`` options (YAML 1.1 reads ``5e-2`` as a string: converted);
- one number for a list option (``lr_milestones: 160``) is a one-element list;
- YAML's bare ``no`` / ``off`` (read as ``false``) for a choice option that has a ``"no"``
  choice (``eval_strategy: no``) means ``"no"``; any other boolean for a non-boolean option is
  an error saying to quote it;
- choice (``Enum`` / ``Literal``) options must hold one of their choices; unknown keys are
  named with the closest valid key; a field's ``aliases`` (``--loss`` for ``base``) are keys too.

:func:`check_number` is the shared range check for the options themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import numbers
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_SUFFIXES", "check_number", "read_config_file", "split_config_file"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def split_config_file(argv: Sequence[str], value_flags: set[str]) -> tuple[Path | None, list[str]]:
    """``(config file, the other arguments)``: the config file is the one argument ending in
    ``.yaml`` / ``.yml`` / ``.json`` that is not the value of a flag (``value_flags``: the flags
    that always take a value), wherever it stands. Two such files are an error."""
    argv = list(argv)
    found = []
    for i, arg in enumerate(argv):
        if not arg.endswith(CONFIG_SUFFIXES) or arg.startswith("-"):
            continue
        previous = argv[i - 1] if i else ""
        if previous in value_flags:  # e.g. --output_dir run.json is a value, not a config
            continue
        found.append(i)
    if len(found) > 1:
        names = [argv[i] for i in found]
        raise ValueError(f"Several config files given ({names}); pass one, then flags.")
    if not found:
        return None, argv
    path = Path(argv.pop(found[0]))
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    return path, argv


def _choices(hint: Any) -> list[str]:
    choices = []
    for arg in _union_args(hint):
        if typing.get_origin(arg) is typing.Literal:
            choices += [str(value) for value in typing.get_args(arg)]
        elif isinstance(arg, type) and issubclass(arg, enum.Enum):
            choices += [str(member.value) for member in arg]
    return choices


def _union_args(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(name: str, value: Any, hint: Any, path: Path) -> Any:
    """``value`` converted to the option's type, or a ``ValueError`` naming the option."""
    args = _union_args(hint)
    where = f"{path}: option {name!r}"
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where} cannot be empty (null); give a value or remove the key.")
    choices = _choices(hint)
    if isinstance(value, bool):
        if bool in args:
            return value
        if value is False and "no" in choices:
            return "no"  # YAML 1.1 reads a bare `no` as false
        raise ValueError(
            f"{where} got the YAML boolean {str(value).lower()}, which is not a valid value"
            + (f" (choices: {choices})" if choices else "")
            + "; quote the value, e.g. 'no'."
        )
    if bool in args:
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{where} must be true or false; got {value!r}.")
    lists = [a for a in args if typing.get_origin(a) in (list, Sequence, tuple)]
    if lists and not (isinstance(value, str) and str in args):  # report_to: none stays a str
        if not isinstance(value, (list, tuple)):
            value = [value]  # one milestone written as a scalar
        item = (typing.get_args(lists[0]) or (Any,))[0]
        return [_coerce(name, v, item, path) for v in value]
    if int in args and float not in args:
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be an integer; got {value!r}.")
    if float in args:
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 5e-2 (no dot) as a string
            except ValueError:
                pass
        if str not in args:
            raise ValueError(f"{where} must be a number; got {value!r}.")
    if choices and str(value) not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where} is {value!r}{hint_text}; choices: {choices}.")
    if isinstance(value, (dict, list)) and not any(
        typing.get_origin(a) is dict or a in (dict, Any) for a in args
    ):
        raise ValueError(f"{where} must be a single value; got {value!r}.")
    return value


def read_config_file(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The options of a YAML/JSON config file, each converted to its field's type (see the
    module docstring). Raises ``ValueError`` naming unknown keys (with the closest valid one)
    and values of the wrong type."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values.")
    hints: dict[str, Any] = {}
    aliases: dict[str, str] = {}  # e.g. the key `loss` for the field `base` (its --loss alias)
    for dc in dataclass_types:
        type_hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            if f.init:
                hints[f.name] = type_hints.get(f.name, Any)
                for alias in f.metadata.get("aliases", ()):
                    aliases[alias.lstrip("-")] = f.name
    both = [(k, aliases[k]) for k in values if k in aliases and aliases[k] in values]
    if both:
        raise ValueError(f"{path} sets both {both[0][0]!r} and {both[0][1]!r}; keep one.")
    values = {aliases.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), hints, n=1)
            described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(
            f"Unknown key(s) in {path}: {', '.join(described)}. Valid keys are the options of "
            "scripts/train.py --help."
        )
    return {key: _coerce(key, value, hints[key], path) for key, value in values.items()}


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``--name`` unless ``value`` is a finite number within the
    bounds (``minimum`` / ``maximum`` inclusive, ``above`` exclusive); ``integer`` requires an
    int; ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"--{name} must be {kind}; got {value!r}.")
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    low_ok = (minimum is None or value >= minimum) and (above is None or value > above)
    if not low_ok or (maximum is not None and value > maximum):
        raise ValueError(f"--{name} must be {kind} {' and '.join(bounds)}; got {value!r}.")
