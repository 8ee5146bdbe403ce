"""One run directory, one run: a lock against a second live run, and the options a run was started with.

``<log_base_dir>/<exp_name>/`` belongs to one training run. :class:`RunLock` holds an exclusive
``fcntl`` lock on ``.lock`` for the life of the process, so a second run in the same directory stops at
once with the first one's pid; the kernel drops the lock of a killed process, so a stale lock file is
taken over (and said so). ``run_options.json`` is the run record (``RunConfig.to_record``); what a resumed
run must share with the run it continues (model, trainable and data options, base weights, datasets, batch
geometry: the fields declared with ``resume=True``) is read from it; resuming with other values is refused with the differences listed, unless ``--resume_with_changes`` is given.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from training.checkpoint import atomic_write_text
from training.config import RunConfig

LOCK_FILE = ".lock"
OPTIONS_FILE = "run_options.json"


class RunInUseError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """Exclusive lock of a run directory (rank 0 only); see the module docstring."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.took_over: str | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunInUseError` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInUseError(
                f"{self.path.parent}: another run is using this directory ({holder}); wait for it to "
                "finish, or choose another --exp_name / --log_base_dir"
            ) from None
        previous = _read_holder(fd)
        if previous != "no holder recorded":
            self.took_over = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Drop the lock after a clean end: the holder record is cleared, so only a run that was killed
        leaves one (which the next run reports taking over)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "no holder recorded"
    if not info:
        return "no holder recorded"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def recorded_resume_values(record: dict[str, Any]) -> dict[str, Any]:
    """The must-match values of a recorded ``run_options.json`` (this version's run record, or the flat
    record of earlier versions), keyed ``group.field`` as :meth:`RunConfig.resume_values`."""
    return RunConfig.from_record(record).resume_values()


def with_later_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded must-match values with every option added since it was written (absent from
    ``recorded``) at its default: what the run trained with, since the option did not exist then."""
    return {**RunConfig.from_record({}).resume_values(), **recorded}


def option_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: recorded -> current`` for every value that differs (nested option groups flattened)."""

    def flat(d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    a, b = flat(recorded), flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_options(run_dir: Path, cfg: RunConfig, resuming: bool) -> list[str]:
    """Compare this run's options with the ones ``run_dir`` was started with; record them when the run
    starts fresh. Returns the differences that were accepted (``--resume_with_changes``), else [].

    The options that must match are those declared with ``resume=True`` (:func:`utils.options.option`).
    Raises ``ValueError`` listing the differences when a resumed run's options changed."""
    path = Path(run_dir) / OPTIONS_FILE
    record = cfg.to_record()
    if not resuming or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2))
        return []
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); remove it to record the options anew") from exc
    try:
        before = recorded_resume_values(recorded)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a run record ({exc}); remove it to record the options anew") from exc
    diffs = option_differences(before, cfg.resume_values())
    if diffs and not cfg.run.resume_with_changes:
        raise ValueError(
            f"{run_dir} holds a run started with other options, and this run would resume its checkpoint:\n  "
            + "\n  ".join(diffs)
            + "\nuse another --exp_name for a new run, pass the original options, or add "
            "--resume_with_changes to continue it with these"
        )
    if diffs:
        atomic_write_text(path, json.dumps(record, indent=2))
    return diffs
