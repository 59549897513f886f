"""The one place data may be downloaded: MNIST-style IDX sets missing from every local folder.

`load_dataset("fashion-mnist")` (no ``root``) first looks in ``$FIREFLY_DATA_DIR``, Debian's
``/usr/share/datasets`` (package ``dataset-fashion-mnist``), ``./data`` and the download cache. When none
holds the files it installs the Debian package where it can (root on a system with apt-get: a fresh machine
of this project's kind, which reaches Debian's registry but not the internet), else asks torchvision to
download them into the cache (``$FIREFLY_DATA_DIR`` when
set, else ``$XDG_CACHE_HOME/firefly-descent`` or ``~/.cache/firefly-descent``), saying so on stderr;
a failed download is one `DatasetError` line naming every way to get the data. ``FIREFLY_OFFLINE=1``
turns the download off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import DatasetError, DatasetNotFoundError
from .idx import IdxSpec

__all__ = ["NO_APT_ENV", "OFFLINE_ENV", "download_cache_dir", "download_idx", "install_debian_package"]

OFFLINE_ENV = "FIREFLY_OFFLINE"
DATA_DIR_ENV = "FIREFLY_DATA_DIR"
NO_APT_ENV = "FIREFLY_NO_APT"  # set to skip the apt-get step


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


def install_debian_package(spec: IdxSpec) -> bool:
    """Install `spec`'s Debian package with apt-get when running as root where apt-get exists; True when it
    installed (the caller searches the system folder again), False when not possible or failed."""
    if spec.debian_package is None or offline() or os.environ.get(NO_APT_ENV, "") not in ("", "0"):
        return False
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    print(f"{spec.title} not found locally; installing Debian's {spec.debian_package} (apt-get)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", spec.debian_package]
    ok = subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    if not ok:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        ok = subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    return ok


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
