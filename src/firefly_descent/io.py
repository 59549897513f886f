"""Atomic file writes: a temporary file in the same folder, flushed and fsync'ed, then renamed over the
target (and the folder fsync'ed), so a reader never sees a half-written checkpoint, log or result.
The file gets the mode `open()` would give it: the existing file's mode, else 0o666 minus the umask."""

from __future__ import annotations

import contextlib
import os
import pickle
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary binary file next to `path`, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; give the mode open() would
                os.fchmod(f.fileno(), _mode_for(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_torch_file(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", error: type[Exception] = ValueError
) -> Any:
    """`torch.load(path, weights_only=True)` whose failures raise `error` with one line saying what happened
    and what to do: a corrupt or truncated file, bytes that are not a torch file, or a file holding Python
    objects beyond tensors and plain data. Never advises ``weights_only=False``, as torch's own message does:
    that would run code from the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise error(
            f"{path}: holds Python objects beyond tensors and plain data (not a firefly-descent file, or corrupt); "
            "refused, since loading arbitrary objects can run code from the file"
        ) from None
    except Exception as e:  # a broken zip archive (truncated, partly copied), or not a torch file at all
        kind = "is corrupt or truncated" if "zip archive" in str(e) else "is not a file written by torch.save"
        raise error(
            f"{path}: {kind} ({type(e).__name__}); write it again, or copy it again if it was transferred"
        ) from None
