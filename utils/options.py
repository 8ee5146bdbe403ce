"""How an option is declared: a dataclass field with its one default and the metadata its flag needs.

Every option a user can set (model, trainable set, data layout) is a field of one dataclass, declared with
:func:`option`; ``training.config`` derives the ``argparse`` flags of every entry point from these fields
(name, type, choices, help, parser), so a default or a parser is never written twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the option's only default.
        help: one line for ``--help``.
        flag: the flag's name without dashes when it differs from the field (``caam`` for ``use_caam``).
        choices: the values allowed.
        parse: turns the command-line text into the field's value; raises ``ValueError`` with a message.
        show: the value as command-line text (``(-1.0, 1.0)`` -> ``"-1,1"``), for messages and records.
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None}
    meta.update(parse=parse, show=show)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field) -> str:
    """The flag of ``field`` without dashes (its ``flag`` metadata, else its name)."""
    return field.metadata.get("flag") or field.name


def is_option(field: dataclasses.Field) -> bool:
    """Whether ``field`` was declared with :func:`option` (other fields have no flag)."""
    return "help" in field.metadata


def show_value(field: dataclasses.Field, value: Any) -> str:
    """``value`` as it would be written on the command line."""
    show = field.metadata.get("show")
    if show is not None:
        return show(value)
    if isinstance(value, bool):
        return ("--" if value else "--no_") + flag_name(field)
    return str(value)


def parse_range(text: str) -> tuple[float, float]:
    """``"lo,hi"`` -> ``(lo, hi)`` with ``lo < hi``; ``ValueError`` with a message otherwise."""
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"{text!r}: expected 'lo,hi', e.g. '-1,1'") from None
    if not lo < hi:
        raise ValueError(f"{text!r}: lo must be < hi")
    return (lo, hi)


def show_range(value: Sequence[float]) -> str:
    """``(-1.0, 1.0)`` -> ``"-1,1"``."""
    return ",".join(f"{float(v):g}" for v in value)
