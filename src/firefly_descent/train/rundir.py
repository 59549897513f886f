"""A run directory: which folders may hold a run, and the files a run writes there.

One run directory holds::

    config.yaml      the resolved config
    metrics.jsonl    one JSON row per epoch
    growth.jsonl     one GrowthReport dict (plus epoch, params, FLOPs...) per growth; `after_epochs`
                     adds the held-out loss/accuracy 1 and 3 epochs after it (anytime metrics)
    train.log        the per-epoch log lines
    summary.json     final metrics (written when the run completes)
    checkpoints/     ckpt-<seq>-e<epoch>[g].pt, the newest `checkpoint.keep_last` kept
    tensorboard/     scalars, with ``train.tensorboard`` and tensorboard installed

`firefly train` and `firefly report` write only where they cannot destroy anything: a new run goes
into a new or empty folder (or a run folder killed before its first checkpoint), and a report never
goes into a run directory. Only the process that `is_main` writes; the others keep silent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from ..io import atomic_write_text
from ..paths import OutputPathError, check_output_dir
from .config import Config, config_to_dict

__all__ = [
    "RUN_FILES",
    "CheckpointError",
    "RunDir",
    "check_new_run_dir",
    "check_resumable_dir",
    "default_run_dir",
]

# what a run writes before its first checkpoint (a folder holding only these may be started over)
RUN_FILES = ("config.yaml", "metrics.jsonl", "growth.jsonl", "train.log", "tensorboard", "checkpoints")

_TENSORBOARD_MISSING = (
    "notice: train.tensorboard is on but tensorboard is not installed, so no TensorBoard logs are written "
    "(pip install tensorboard, or set train.tensorboard=false to silence this)"
)
_said_tensorboard_missing = False


class CheckpointError(ValueError):
    """A checkpoint or run directory is missing, unreadable or not ours (one-line message)."""


def require_run_dir(run_dir: Path) -> None:
    """Refuse a path that is not a run directory, saying whether it is missing or a file."""
    if not run_dir.is_dir():
        what = "is a file, not a run directory (a run's --out folder)" if run_dir.exists() else "no such run directory"
        raise CheckpointError(f"{run_dir}: {what}")


def default_run_dir(cfg: Config) -> Path:
    """``runs/<config name>-<timestamp>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def _has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(f.name.startswith("ckpt-") and f.suffix == ".pt" for f in folder.iterdir())


def check_new_run_dir(run_dir: str | os.PathLike[str], restart: bool = False) -> Path:
    """Refuse, with one line, a folder a new run must not write into; return it.

    Allowed: a folder that does not exist yet, an empty one, or one holding only the files of a run
    killed before its first checkpoint (`RUN_FILES`, nothing logged); with ``restart`` (resuming such a
    run) its log files may hold lines. Anything else (a finished or resumable run, an export, a report,
    unrelated files) is refused, since the run would overwrite some of it."""
    p = Path(run_dir)
    metrics = p / "metrics.jsonl"
    if _has_checkpoints(p) or (not restart and metrics.is_file() and metrics.stat().st_size > 0):
        raise CheckpointError(f"{p}: already holds a run; use `firefly resume {p}` or another --out")
    if p.is_dir() and not restart:
        foreign = sorted(e.name for e in p.iterdir() if e.name not in RUN_FILES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputPathError(
                f"run directory {p}: holds files that are not this run's ({shown}); "
                "a run would overwrite some of them, so choose a new or empty folder"
            )
    return check_output_dir(p, "run directory")


def check_resumable_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Refuse, with one line, a run folder a resumed run could not write its logs and checkpoints into."""
    p = Path(run_dir)
    check_output_dir(p, "run directory")
    if (p / "checkpoints").is_dir():
        check_output_dir(p / "checkpoints", "run directory")
    for name in RUN_FILES + ("summary.json",):
        f = p / name
        if f.is_file() and not os.access(f, os.W_OK):
            raise OutputPathError(
                f"run directory {p}: {name} is read-only, so the run cannot continue; make it writable"
            )
    return p


class RunDir:
    """The files of one run: the config, the jsonl logs, the log lines, TensorBoard and the summary."""

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.writer: Any = None

    def create(self, cfg: Config) -> None:
        """Write the resolved config and empty logs (a new run, or one started over)."""
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(
            yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), encoding="utf-8"
        )
        for name in ("metrics.jsonl", "growth.jsonl", "train.log"):
            (self.path / name).write_text("", encoding="utf-8")

    def append_jsonl(self, name: str, row: Mapping[str, Any]) -> None:
        """Add one JSON line to `name` (flushed at once: a killed run keeps every finished epoch)."""
        if not self.is_main:
            return
        with open(self.path / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()

    def rewrite_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Replace `name` atomically with `rows` (after a resume, or when a growth record gained numbers)."""
        if not self.is_main:
            return
        atomic_write_text(self.path / name, "".join(json.dumps(row, default=float) + "\n" for row in rows))

    def log(self, line: str) -> None:
        """Print `line` (above any progress bar) and append it to ``train.log``."""
        if not self.is_main:
            return
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        with open(self.path / "train.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``: written last, so its presence marks a completed run."""
        if self.is_main:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")

    # ---- TensorBoard (an optional dependency)

    def open_tensorboard(self, enabled: bool) -> None:
        """Start TensorBoard logging; without tensorboard installed, say so once per process."""
        global _said_tensorboard_missing
        if not enabled or not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (optional dependency)
        except Exception:  # tensorboard not installed
            if not _said_tensorboard_missing:
                print(_TENSORBOARD_MISSING, file=sys.stderr, flush=True)
                _said_tensorboard_missing = True
            return
        self.writer = SummaryWriter(str(self.path / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar (nothing without a writer)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
