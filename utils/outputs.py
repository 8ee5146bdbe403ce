"""Nothing a user has is overwritten, and a full disk is a sentence: the output folders of the commands.

* :func:`check_output_dir`: an output folder (``--save_path``, ``--dst``) may not be, lie inside or hold
  what the command reads (``--version``, ``--weight``, ``--src``…), and a folder that is not empty is
  replaced only with ``--overwrite``; refused with the flags and both paths named, before anything is built.
* :func:`staged_dir`: the output is written into a temporary sibling ``.<name>.tmp-<host>-<pid>/`` and
  moved into place (:func:`replace_dir_atomically`) only when complete; the old content is removed only
  after that. A crash, a full disk or an error leaves the previous content where it was.
* :func:`on_disk_full`: a write that fails for want of space (``ENOSPC`` / ``EDQUOT``, and the forms
  torch and safetensors report it in) becomes :class:`DiskFullError`, naming the path, the disk it is on
  and the free space, after the partial files are removed.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import shutil
import socket
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

#: ``errno`` values of a write that failed for want of space (a full disk, an exhausted quota).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How safetensors (Rust) and other wrappers word a full disk in their own exception types.
_DISK_FULL_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|StorageFull|QuotaExceeded|os error (?:28|122)\b"
)
#: torch's zip writer (``torch.save``) reports a failed write without its errno ("unexpected pos …",
#: "file write failed"): it counts as a full disk when the disk is nearly full right after it.
_TORCH_WRITER_TEXT = re.compile(r"inline_container|PytorchStreamWriter")
LOW_SPACE_BYTES = 1 << 30


class OutputDirError(ValueError):
    """An output folder that would overwrite what the user has (an input, or content without ``--overwrite``)."""


class DiskFullError(OSError, ValueError):
    """A save failed for want of space; the message names the path, the disk and its free space. A
    ``ValueError`` too, so the entry points end it with one ``error:`` line like any user error."""


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def existing_ancestor(path: str | Path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent."""
    p = _real(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def mount_point(path: str | Path) -> Path:
    """The mount point of the disk that holds (or would hold) ``path``."""
    p = existing_ancestor(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _quota(exc: BaseException | None) -> bool:
    return exc is not None and any(getattr(e, "errno", None) == errno.EDQUOT for e in _chain(exc))


def disk_full_message(
    path: str | Path, exc: BaseException | None = None, cleaned: bool = True, kept: str = ""
) -> str:
    """The sentence for a save to ``path`` that ran out of space: the path, the disk (its mount point),
    its free space now (``cleaned``: the partial files already removed), what survived (``kept``), what
    to do, and the writer's own words (``exc``)."""
    usage = shutil.disk_usage(existing_ancestor(path))
    what = "your disk quota is exhausted on the disk" if _quota(exc) else "no space left on the disk"
    after = " after removing the partial files" if cleaned else ""
    kept = f"; {kept}" if kept else ""
    said = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return (
        f"{path}: cannot save: {what} mounted at {mount_point(path)}, which has {human_size(usage.free)} "
        f"free of {human_size(usage.total)}{after}{kept}; free some space there or write to another disk, "
        f"then run the command again{said}"
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def is_disk_full(exc: BaseException, path: str | Path) -> bool:
    """Whether ``exc``, raised while writing under ``path``, means the disk (or quota) is full: an
    ``OSError`` with ``ENOSPC`` / ``EDQUOT`` anywhere in its chain, a wrapper's message saying so
    (safetensors: "No space left on device (os error 28)"), or torch's zip writer failing while less than
    1 GiB (on a small disk: 5 % of it) is free."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(e)):
            return True
    if any(isinstance(e, RuntimeError) and _TORCH_WRITER_TEXT.search(str(e)) for e in _chain(exc)):
        usage = shutil.disk_usage(existing_ancestor(path))
        return usage.free < min(LOW_SPACE_BYTES, usage.total // 20)
    return False


def release_frames(exc: BaseException) -> None:
    """Free what the finished frames of ``exc``'s traceback hold: torch's zip writer keeps its half-written
    file open there, so its space (even of a removed file) comes back only once they are cleared."""
    for e in _chain(exc):
        traceback.clear_frames(e.__traceback__)
    gc.collect()


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; nothing when it is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def on_disk_full(path: str | Path, partial: Iterable[str | Path] = (), kept: str = "") -> Iterator[None]:
    """Turn a failed write under ``path`` that ran out of space into :class:`DiskFullError` (after
    removing the ``partial`` files and folders; ``kept`` says what survived); every other error passes
    unchanged."""
    partial = [Path(p) for p in partial]
    try:
        yield
    except DiskFullError:  # raised (and named) by an inner write: its partial files go too
        for p in partial:
            remove_path(p)
        raise
    except Exception as exc:
        if not is_disk_full(exc, path):
            raise
        release_frames(exc)
        for p in partial:
            remove_path(p)
        error = DiskFullError(disk_full_message(path, exc, cleaned=bool(partial), kept=kept))
        error.errno = errno.EDQUOT if _quota(exc) else errno.ENOSPC
        raise error from exc


# --- output folders ---


def _relation(out: Path, inp: Path) -> str | None:
    """How the output folder ``out`` overlaps the input ``inp`` (both real paths), or None."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def refuse_inputs(out: str | Path, inputs: Mapping[str, str | Path | None], flag: str) -> None:
    """Refuse the output folder ``out`` (given as ``flag``) when it is, lies inside or contains one of
    ``inputs`` (``{"--version": path}``; None or empty entries are skipped). A file input (a SAM ``.pth``)
    protects the file itself: ``out`` may not be it nor hold it, but may be its sibling."""
    real_out = _real(out)
    for name, given in inputs.items():
        if given is None or str(given) == "":
            continue
        inp = _real(given)
        relation = _relation(real_out, inp)
        if relation is not None:
            why = {
                "is": "writing there would overwrite what the command reads",
                "is inside": "the command reads that folder and never writes into it",
                "contains": "writing or replacing it would touch what the command reads",
            }[relation]
            raise OutputDirError(f"{flag} {out} {relation} {name} {given}: {why}; choose another {flag}")


def check_output_dir(
    out: str | Path,
    inputs: Mapping[str, str | Path | None],
    overwrite: bool,
    flag: str,
    overwrite_flag: str = "--overwrite",
) -> Path:
    """Check the output folder ``out`` (``flag``) before anything is built: not one of ``inputs`` nor
    inside nor around one (:func:`refuse_inputs`), not a file, and empty unless ``overwrite``. Leftovers of
    an interrupted earlier write to it are tidied first (:func:`recover_interrupted`). Returns ``out``."""
    out = Path(out)
    recover_interrupted(out)
    refuse_inputs(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{flag} {out} is a file, not a folder; choose another {flag}")
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise OutputDirError(
                f"{flag} {out} is not empty ({shown}); pass {overwrite_flag} to replace its content (the "
                f"old content is removed only once the new one is complete), or choose another {flag}"
            )
    return out


def _sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    return out.with_name(f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid() if pid is None else pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(out: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-<host>-<pid>`` siblings of ``out`` left by a process of this host that is gone."""
    prefix, host = f".{out.name}.{kind}-", socket.gethostname()
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}-*") if out.parent.is_dir() else ():
        owner, _, pid = p.name[len(prefix) :].rpartition("-")
        if owner == host and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            found.append(p)
    return found


def recover_interrupted(out: str | Path) -> None:
    """Tidy what a killed write to ``out`` left: its temporary folder is removed; the previous content
    moved aside by an interrupted :func:`replace_dir_atomically` is moved back when ``out`` is missing,
    else removed. Each step is said."""
    out = _real(out)
    for tmp in _stale_siblings(out, "tmp"):
        print(f"note: removing {tmp}, the unfinished output of an interrupted run", flush=True)
        remove_path(tmp)
    for old in _stale_siblings(out, "old"):
        if not out.exists():
            print(f"note: moving {old} back to {out}: a replacement of it was interrupted", flush=True)
            os.replace(old, out)
        else:
            print(f"note: removing {old}, the replaced content of {out}", flush=True)
            remove_path(old)


def replace_dir_atomically(new: str | Path, out: str | Path) -> None:
    """Move the complete folder ``new`` to ``out`` (same disk). An absent or empty ``out`` is replaced
    in one rename; a non-empty one is first moved aside to ``.<name>.old-…`` and removed after the new
    content is in place (moved back if that fails; a kill between the two renames is undone by
    :func:`recover_interrupted` on the next run)."""
    new, out = Path(new), _real(out)
    try:
        os.replace(new, out)  # rename(2) replaces a missing or empty folder in one step
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = _sibling(out, "old")
    remove_path(old)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    remove_path(old)


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write the output into; when the block completes it is moved
    to ``out`` (:func:`replace_dir_atomically`: the caller checked ``out`` with :func:`check_output_dir`).
    On any error the temporary folder is removed and ``out`` is left as it was; a write that ran out of
    space raises :class:`DiskFullError` naming ``out``."""
    real = _real(out)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(real, "tmp")
    remove_path(tmp)
    tmp.mkdir()
    kept = f"{out} is as it was" if real.exists() and any(real.iterdir()) else ""
    try:
        with on_disk_full(out, partial=[tmp], kept=kept):
            yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    try:
        replace_dir_atomically(tmp, real)
    finally:
        remove_path(tmp)
