"""Output paths checked up front: one clear line before any long work, instead of an OS traceback later.

`check_output_dir` walks up to the nearest existing folder, refuses a file in the way, and probes that the
folder accepts new entries (a temporary folder created and removed at once), so read-only file systems,
permissions, ``/proc`` and ``/sys`` are all caught the same way. Nothing is left behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["OutputPathError", "check_output_dir", "is_run_dir", "os_error_line"]


class OutputPathError(ValueError):
    """An output path cannot be written (one-line message naming the path and the fix)."""


def os_error_line(e: OSError) -> str:
    """One line for an `OSError` on a path: ``<path>: <reason>`` (no errno numbers, no traceback)."""
    reason = e.strerror or type(e).__name__
    if e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {reason}"
    if e.filename is not None:
        return f"{e.filename}: {reason}"
    return " ".join(str(e).split()) or type(e).__name__


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a training run's folder (it has the per-epoch log or checkpoints): other commands
    never write into one."""
    p = Path(path)
    return (p / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir()


def check_output_dir(path: str | os.PathLike[str], label: str = "output directory") -> Path:
    """Raise `OutputPathError` unless `path` is, or can be created as, a writable folder; return it."""
    p = Path(path).expanduser()
    target = Path(os.path.abspath(p))
    existing = target
    while not os.path.lexists(existing):
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == target:
            raise OutputPathError(f"{label} {p}: exists and is not a folder; choose another path")
        raise OutputPathError(f"{label} {p}: {existing} is a file, not a folder; choose another path")
    try:
        probe = tempfile.mkdtemp(prefix=".firefly-write-check-", dir=existing)
        os.rmdir(probe)
    except OSError as e:
        if e.errno == errno.ENOENT:  # e.g. /proc: the folder exists but takes no new entries
            why = "it does not accept new files or folders"
        else:
            why = e.strerror or type(e).__name__
        where = "" if existing == target else f" (in {existing})"
        raise OutputPathError(f"{label} {p}: cannot write there{where}: {why}; choose another path") from None
    return p
