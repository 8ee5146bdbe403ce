"""How an option is declared: a dataclass field with its one default and the metadata its flag needs.

Every option a user can set (model, trainable set, data layout, optimiser, loop, run, evaluation) is a field of
one dataclass, declared with :func:`option`: its one default, help, choices, parser, range check and whether
a resumed run must keep it are the field's metadata. :func:`add_option_flags` derives the ``argparse`` flags
of every entry point from these fields and :func:`options_from_args` builds the dataclass from the parsed
flags, so a default, a parser or a range is never written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    check: Callable[[Any], str | None] | None = None,
    resume: bool = False,
    aliases: Sequence[str] = (),
    off: str | None = None,
    repeat: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the option's only default.
        help: one line for ``--help``.
        flag: the flag's name without dashes when it differs from the field (``caam`` for ``use_caam``).
        choices: the values allowed.
        parse: turns the command-line text into the field's value; raises ``ValueError`` with a message.
        show: the value as command-line text (``(-1.0, 1.0)`` -> ``"-1,1"``), for messages and records.
        check: the range check: returns the problem (``"must be >= 1"``) or None; :func:`problems` runs it.
        resume: a resumed run must share this value with the run it continues (:func:`resume_fields`).
        aliases: other spellings of the flag (``vision-tower``).
        off: a switch's off flag when it is not ``no_<flag>`` (``--eval`` for ``--no_eval``).
        repeat: the flag may be given several times; the value is the tuple of them (default ``()``).
        metavar: the value's name in ``--help``.
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None}
    meta.update(parse=parse, show=show, check=check, resume=resume, aliases=tuple(aliases), off=off)
    meta.update(repeat=repeat, metavar=metavar)
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


# --- range checks: ``check=`` of :func:`option`; each returns the problem, or None when the value is fine ---


def at_least(low: float) -> Callable[[Any], str | None]:
    """``value >= low`` (``"must be >= low"``)."""

    def check(value: Any) -> str | None:
        return None if value >= low else f"must be >= {low}"

    return check


def positive_finite(value: float) -> str | None:
    """``0 < value < inf``."""
    return None if value > 0 and math.isfinite(value) else "out of range"


def fraction(value: float) -> str | None:
    """``0 <= value < 1`` (betas, dropout)."""
    return None if 0 <= value < 1 and math.isfinite(value) else "out of range"


def finite_at_least_zero(value: float) -> str | None:
    """``0 <= value < inf`` (loss weights)."""
    return None if value >= 0 and math.isfinite(value) else "must be a finite number >= 0"


def problems(options: Any) -> list[str]:
    """``--flag value: problem`` for every option field of the dataclass ``options`` whose ``check`` fails."""
    out = []
    for f in dataclasses.fields(options):
        check = f.metadata.get("check")
        value = getattr(options, f.name)
        problem = check(value) if check is not None and value is not None else None
        if problem:
            out.append(f"--{flag_name(f)} {value}: {problem}")
    return out


def resume_fields(cls: type) -> list[str]:
    """Names of the option fields of ``cls`` that a resumed run must share with the run it continues."""
    return [f.name for f in dataclasses.fields(cls) if is_option(f) and f.metadata.get("resume")]


# --- flags derived from the fields ---


def add_switch(
    parser: argparse._ActionsContainer, name: str, default: bool, help: str, off: str | None = None
) -> None:
    """``--name`` sets True and ``--no_name`` (or ``--<off>``) sets False; the last one given wins, so a
    recipe's command line can be overridden by appending a flag."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", help=f"{help} (default: {default})")
    off_flag = off or f"no_{name}"
    parser.add_argument(f"--{off_flag}", dest=name, action="store_false", help=f"turn --{name} off")
    parser.set_defaults(**{name: default})


def _arg_type(parse: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` becomes the flag's error message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag
    return convert


def _unset_switch(parser: argparse._ActionsContainer, name: str, help: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help)
    group.add_argument(
        f"--no_{name}", dest=name, action="store_false", default=None, help=f"turn --{name} off"
    )


def add_option_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    unset: bool = False,
    skip: Sequence[str] = (),
    only: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    required: Collection[str] = (),
) -> None:
    """One flag per option field of ``cls`` (:func:`option`): its name, aliases, type or parser, choices,
    help and default come from the field. ``unset=True``: every default is None (the caller fills the
    options it was not given from a record, e.g. the merge script from ``trainable.json``). ``only``: just
    these fields; ``defaults``: another default for some fields; ``required``: fields whose flag must be given."""
    defaults = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if not is_option(f) or f.name in skip or (only is not None and f.name not in only):
            continue
        name, help, meta = flag_name(f), f.metadata["help"], f.metadata
        default = defaults.get(f.name, _default(f))
        if isinstance(default, bool):
            if unset:
                _unset_switch(parser, name, f"{help} (default: recorded, else {default})")
            else:
                add_switch(parser, name, default, help, off=meta.get("off"))
            continue
        flags = [f"--{name}", *(f"--{a}" for a in meta.get("aliases") or ())]
        if meta.get("repeat"):
            parser.add_argument(
                *flags, dest=name, action="append", default=[], metavar=meta.get("metavar"), help=help
            )
            continue
        parse = meta.get("parse")  # plain types keep argparse's own message ("invalid int value")
        parser.add_argument(
            *flags,
            dest=name,
            type=_arg_type(parse, name) if parse else (str if default is None else type(default)),
            required=f.name in required,
            default=None if unset or f.name in required else default,
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            help=help,
        )


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def options_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """``cls`` from the option flags in the parsed ``args`` (the parser's output); flags that are None keep
    ``base``'s value (default: ``cls()``'s). Repeated flags become tuples."""
    base = base if base is not None else cls()
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, flag_name(f), None)
        if is_option(f) and value is not None:
            values[f.name] = tuple(value) if f.metadata.get("repeat") else value
    return dataclasses.replace(base, **values)


def given_fields(cls: type, given: Collection[str]) -> set[str]:
    """Names of the option fields of ``cls`` whose flags are in ``given`` (the flags a command line set)."""
    return {f.name for f in dataclasses.fields(cls) if is_option(f) and flag_name(f) in set(given)}


_UNSET = object()


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The destinations the command line ``argv`` sets explicitly (argparse fills a default only for
    attributes that the namespace lacks, so a namespace pre-filled with a sentinel shows what was given)."""
    plain = [a for a in parser._actions if a.dest != "help" and not isinstance(a, argparse._AppendAction)]
    probe = argparse.Namespace(**{a.dest: _UNSET for a in plain})
    parsed, _ = parser.parse_known_args(argv, namespace=probe)
    given = {k for k, v in vars(parsed).items() if v is not _UNSET}
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    return sorted((given - appended) | {d for d in appended if getattr(parsed, d)})
