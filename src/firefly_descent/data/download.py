"""The one place data may be downloaded: MNIST-style IDX sets missing from every local folder.

`load_dataset("fashion-mnist")` (no ``root``) first looks in ``$FIREFLY_DATA_DIR``, Debian's
``/usr/share/datasets`` (package ``dataset-fashion-mnist``), ``./data`` and the download cache. Only when
none holds the files does it ask torchvision to download them into the cache (``$FIREFLY_DATA_DIR`` when
set, else ``$XDG_CACHE_HOME/firefly-descent`` or ``~/.cache/firefly-descent``), saying so on stderr;
a failed download is one `DatasetError` line naming every way to get the data. ``FIREFLY_OFFLINE=1``
turns the download off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import DatasetError, DatasetNotFoundError
from .idx import IdxSpec

__all__ = ["OFFLINE_ENV", "download_cache_dir", "download_idx"]

OFFLINE_ENV = "FIREFLY_OFFLINE"
DATA_DIR_ENV = "FIREFLY_DATA_DIR"


def download_cache_dir() -> Path:
    """Where downloads go: ``$FIREFLY_DATA_DIR``, else the user's cache folder."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "firefly-descent"


def offline() -> bool:
    """True when ``$FIREFLY_OFFLINE`` forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def download_idx(spec: IdxSpec, not_found: DatasetNotFoundError) -> Path:
    """Download `spec`'s IDX files with torchvision into the cache; return the folder to search.

    `not_found` is the local search's error, kept in the message if the download fails too."""
    dest = download_cache_dir()
    hint = (
        f"{not_found}; the download into {dest} failed too"
        if not offline()
        else f"{not_found}; downloads are off ({OFFLINE_ENV} is set)"
    )
    if offline():
        raise DatasetError(hint)
    print(
        f"{spec.title} not found locally; downloading it with torchvision into {dest} "
        f"(offline alternative: {spec.install_hint})",
        file=sys.stderr,
        flush=True,
    )
    try:
        import torchvision.datasets as tvd

        cls = getattr(tvd, spec.torchvision_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(dest), train=train, download=True)
    except Exception as e:  # no network, proxy, disk: one line, whatever torchvision raised
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DatasetError(f"{hint} ({type(e).__name__}: {reason})") from None
    return dest
