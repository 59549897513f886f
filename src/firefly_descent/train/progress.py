"""Console output of a run that is not a progress bar: periodic progress lines and the final line.

On a terminal the loop draws tqdm bars. Redirected to a file or a CI log, bars are off, and
`ProgressLines` prints ``epoch 3/8: batch 120/157 (76%), 8.1 batch/s, ETA 5s, loss 0.4123`` at most
every ``FIREFLY_PROGRESS_SECONDS`` seconds (default 30; 0 prints every batch), so a long epoch is
never silent.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["PROGRESS_ENV", "ProgressLines", "done_line", "progress_interval"]

PROGRESS_ENV = "FIREFLY_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def progress_interval() -> float:
    """Seconds between progress lines, from ``$FIREFLY_PROGRESS_SECONDS`` (bad or missing: 30)."""
    try:
        value = float(os.environ.get(PROGRESS_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 and value == value else DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class ProgressLines:
    """Rate-limited one-line progress reports for output that is not a terminal."""

    def __init__(
        self,
        total: int,
        desc: str,
        every: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = int(total)
        self.desc = desc
        self.every = progress_interval() if every is None else float(every)
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.lines = 0

    def update(self, done: int, loss: float | None = None) -> bool:
        """Report `done` of `total` batches if `every` seconds passed since the last line; True if printed."""
        now = self.clock()
        if now - self.last < self.every or done <= 0:
            return False
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        parts = [f"{self.desc}: batch {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%)"]
        parts.append(f"{rate:.1f} batch/s" if rate >= 1 else f"{1 / rate:.1f} s/batch")
        if self.total > done:
            parts.append(f"ETA {_duration((self.total - done) / rate)}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        print(", ".join(parts), file=self.stream or sys.stderr, flush=True)
        self.lines += 1
        return True


def done_line(summary: dict[str, Any]) -> str:
    """The last line of a run (console and train.log): where it is, final accuracy, size, growths, time."""
    acc = summary.get("final_test_acc")
    best = summary.get("best_test_acc")
    parts = [f"done: {summary.get('run_dir')}"]
    if acc is not None:
        parts.append(f"test acc {acc:.2%} (best {best:.2%})")
    elif summary.get("final_test_loss") is not None:
        parts.append(f"test loss {summary['final_test_loss']:.4g}")
    if summary.get("params") is not None:
        parts.append(f"params {summary['params']:,}")
    parts.append(f"growths {summary.get('num_growths', 0)}")
    if summary.get("total_time") is not None:
        parts.append(f"time {summary['total_time']:.1f}s")
    return " | ".join(parts)
