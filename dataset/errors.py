"""Errors raised on bad input data. Every message names the offending file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: ``DataError(path, problem)`` renders as ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class LightFieldError(DataError):
    """A view or disparity file is missing, unreadable, or inconsistent with its scene."""


class AnnotationError(DataError):
    """A referring-expression or instance annotation is malformed or points at nothing."""
