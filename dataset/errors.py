"""Errors raised on bad input data. Every message names the offending file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


def _worker_sentence(message: str, cls: type) -> str:
    """The error's own sentence out of the text torch's DataLoader re-raises a worker's error with
    (``"Caught X in DataLoader worker process 0.\\nOriginal Traceback ...\\nmodule.X: <sentence>"``),
    followed by where it happened; any other message unchanged."""
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return message
    where = message.split("\n", 1)[0][len("Caught ") :].rstrip(".")
    where = where.split(" ", 1)[1] if " " in where else where  # "X in DataLoader worker process 0"
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = message.rfind(name)
        if at >= 0:
            return f"{message[at + len(name) :].strip()} ({where})"
    return message


class DataError(ValueError):
    """Bad input data: ``DataError(path, problem)`` renders as ``"<path>: <problem>"``.

    ``DataError(message)`` (one argument) is how torch's DataLoader rebuilds an error raised in a worker
    process: the worker's traceback is dropped and the error's own sentence kept, so a bad file read by a
    worker ends a run with one line naming it, as it does without workers."""

    def __init__(self, path: str | Path | None, problem: str | None = None) -> None:
        if problem is None:
            path, problem = None, _worker_sentence(str(path), type(self))
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class LightFieldError(DataError):
    """A view or disparity file is missing, unreadable, or inconsistent with its scene."""


class AnnotationError(DataError):
    """A referring-expression or instance annotation is malformed or points at nothing."""
