"""Atomic, `weights_only`-loadable checkpoints and RNG-state capture.

A checkpoint is a dict of tensors and plain data only (dicts, lists, str, int, float, bool,
None), so ``torch.load(path, weights_only=True)`` reads it. Files are written to a temporary
name in the run directory, flushed and fsync'ed, then moved into place with `os.replace`, so a
run killed at any moment leaves only complete checkpoints behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import replay_history
from ..io import atomic_save, load_torch_file
from ..models import build_model
from .rundir import CheckpointError

__all__ = [
    "CheckpointError",
    "atomic_save",
    "capture_rng",
    "checkpoint_path",
    "jsonable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "rebuild_model",
    "restore_rng",
]

FORMAT = "firefly-descent-checkpoint"
VERSION = 1
_NAME_RE = re.compile(r"^ckpt-(\d{6})-e(\d{4})(g?)\.pt$")


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON so only plain containers/scalars remain (weights_only-safe)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def capture_rng(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """All RNG states as tensors/lists: torch CPU, CUDA (if any), numpy, python, loader generator."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": [int(v) for v in py_state[1]],
            "gauss": None if py_state[2] is None else float(py_state[2]),
        },
        "cuda": [],
        "loader": None if loader_generator is None else loader_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"].cpu())


def checkpoint_path(run_dir: str | Path, seq: int, epoch: int, grown: bool) -> Path:
    """``ckpt-<seq>-e<epoch>[g].pt``: `seq` orders checkpoints, ``g`` marks a post-growth one."""
    return Path(run_dir) / "checkpoints" / f"ckpt-{seq:06d}-e{epoch:04d}{'g' if grown else ''}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (and temp files left by killed runs)."""
    d = Path(run_dir) / "checkpoints"
    if d.is_dir():
        for p in d.glob(".ckpt-*.tmp"):
            if not p.name.endswith(f".{os.getpid()}.tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def rebuild_model(ckpt: dict[str, Any], map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint's (possibly grown) model: constructor + `replay_history` + weights."""
    spec = ckpt["model"]
    try:
        model = build_model(spec["name"], **spec["kwargs"])
    except (ValueError, TypeError) as e:  # a user's model (import path) not importable here, or changed since
        raise CheckpointError(f"cannot rebuild the checkpoint's model: {' '.join(str(e).split())}") from None
    history = ckpt.get("growth_history") or []
    if history:
        replay_history(model, history)
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: weights do not fit the rebuilt model ({msg})"
        ) from None
    return model.to(map_location)


def export_hint(path: Path) -> str | None:
    """What to say when a folder given as a run directory is an export (`firefly export` writes
    architecture.json, model.safetensors and config.yaml, and no checkpoints)."""
    if not (path / "architecture.json").is_file():
        return None
    return (
        f"{path} is an export (architecture.json, model.safetensors), not a run directory: load it with "
        f"ff.load_export({str(path)!r}); to train its config again, firefly train {path / 'config.yaml'} --out NEW_DIR"
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or a run directory's newest one) with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(export_hint(path) or f"{path}: no checkpoints in this run directory")
        path = latest
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    ckpt = load_torch_file(path, map_location, CheckpointError)  # one line, never torch's unsafe advice
    if isinstance(ckpt, dict) and ckpt.get("format") == "firefly-descent/1":
        raise CheckpointError(
            f"{path}: a firefly_descent.save file, not a training checkpoint; load it with "
            "firefly_descent.load(path, build=YourModel)"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a firefly-descent checkpoint (`firefly train` writes them in RUN/checkpoints/)"
        )
    ckpt["path"] = str(path)
    return ckpt
