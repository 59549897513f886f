"""Reading and writing the suites' result files: one JSON file per (suite, method, seed), format `FORMAT`.

The driver (benchmarks/suites.py) writes them; benchmarks/make_docs.py and benchmarks/suite_e_report.py read
them. Layout: ``<results>/<suite>/<method>-s<seed>.json``, or ``...failed.json`` for a failed run (retried on
the next run of the suite). A file is written atomically, so it is whole or absent.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from firefly_descent.io import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FORMAT = "firefly-bench/1"

__all__ = [
    "CODE_VERSION",
    "FORMAT",
    "atomic_write_json",
    "default_results",
    "environment",
    "jsonable",
    "load_results",
    "read_json",
    "read_jsonl",
    "rel",
    "result_path",
    "rounds_of",
]


def result_path(results: Path, suite: str, method: str, seed: int, failed: bool = False) -> Path:
    """Where one run's result lives."""
    return results / suite / f"{method}-s{seed}{'.failed' if failed else ''}.json"


def default_results(preset: str) -> Path:
    """benchmarks/results for the full preset, benchmarks/results-quick for the quick one."""
    return HERE / ("results" if preset == "full" else f"results-{preset}")


def read_json(path: Path) -> dict[str, Any] | None:
    """A result file's content, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename): a result file is whole or absent."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl / growth.jsonl ([] when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types (tensors and arrays through `.tolist()`, anything else through `str`)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def rel(p: Path) -> str:
    """`p` relative to the working directory when it lies below it (paths recorded in result files)."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def load_results(
    results: Path, suite: str, preset: str
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], int]:
    """({method: [records sorted by seed]}, [failed records], files of other presets) of one suite."""
    ok: dict[str, list[dict[str, Any]]] = {}
    failed: list[dict[str, Any]] = []
    other = 0
    folder = results / suite
    if not folder.is_dir():
        return ok, failed, other
    for path in sorted(folder.glob("*.json")):
        rec = read_json(path)
        if not rec or rec.get("format") != FORMAT or rec.get("suite") != suite:
            continue
        if rec.get("preset") != preset:
            other += 1
            continue
        rec["_file"] = path
        if path.name.endswith(".failed.json"):
            failed.append(rec)
        else:
            ok.setdefault(rec["method"], []).append(rec)
    for recs in ok.values():
        recs.sort(key=lambda r: r["seed"])
    done = {(m, r["seed"]) for m, recs in ok.items() for r in recs}
    failed = [f for f in failed if (f["method"], f["seed"]) not in done]
    return ok, failed, other


def rounds_of(metrics: list[dict[str, Any]], growths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per growth round (0 = the starting network): params, FLOPs, test accuracy right after the growth and
    at the end of the round's training phase (the epoch before the next growth, or the last epoch)."""
    if not metrics:
        return []
    by_epoch = {int(r["epoch"]): r for r in metrics}
    last = int(metrics[-1]["epoch"])
    ends = [int(g["epoch"]) for g in growths] + [last]
    out = [
        {
            "round": 0,
            "epoch": 0,
            "params": metrics[0].get("params"),
            "flops": metrics[0].get("flops"),
            "test_acc_after_growth": None,
            "growth_time": 0.0,
            "end_epoch": ends[0],
            "test_acc": by_epoch.get(ends[0], {}).get("test_acc"),
        }
    ]
    for i, g in enumerate(growths, start=1):
        end = ends[i]
        out.append(
            {
                "round": i,
                "epoch": int(g["epoch"]),
                "params": g.get("params"),
                "flops": g.get("flops"),
                "test_acc_after_growth": g.get("test_acc_after"),
                "growth_time": g.get("time"),
                "end_epoch": end,
                "test_acc": by_epoch.get(end, {}).get("test_acc"),
            }
        )
    return out


def _code_version() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        diff = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if diff.stdout.strip() else "")


CODE_VERSION = _code_version()  # at start-up: the code this process runs, whatever is committed meanwhile


def environment() -> dict[str, Any]:
    """Machine and software facts recorded with every result."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "code": CODE_VERSION,
    }
