"""Reading a run directory's JSONL logs in tests, without the wall-clock fields that differ between runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TIME_KEYS = {
    "epoch_time",
    "eval_time",
    "elapsed",
    "growth_time",
    "time",
    "grow_time",
    "bn_refresh_time",
    "timings",
    "total_time",
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def strip_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]
