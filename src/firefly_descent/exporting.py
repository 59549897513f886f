"""Exports: a grown model as ``model.safetensors`` + ``architecture.json`` (+ ``config.yaml``), and back.

``architecture.json`` holds the constructor (a registered model name and its keyword arguments) and the
recorded growth history, so `load_export` rebuilds the grown architecture without pickled classes:
constructor, then `replay_history`, then the weights. A model of your own class loads with
``load_export(path, build=MyModel)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from .engine.apply import HISTORY_ATTR, growth_history
from .engine.history import describe_misfit, replay_history
from .errors import GrowthError
from .io import atomic_write, atomic_write_text
from .models import build_model
from .train.checkpoint import load_checkpoint, rebuild_model

__all__ = ["ExportError", "export_checkpoint", "export_model", "load_export"]

WEIGHTS = "model.safetensors"
ARCHITECTURE = "architecture.json"


class ExportError(ValueError):
    """An export folder is missing, incomplete or does not fit the model (one-line message)."""


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    model_spec: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `model` to `out_dir`; `model_spec` is ``{"name": ..., "kwargs": {...}}`` of a registered model
    (`firefly_descent.models`), or None for a model of your own class. Returns the architecture record."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    blob = st_save(tensors, metadata={"format": "pt"})
    atomic_write(out / WEIGHTS, lambda f: f.write(blob))
    arch: dict[str, Any] = {
        "model": dict(model_spec) if model_spec is not None else None,
        "growth_history": json.loads(json.dumps(growth_history(model), default=str)),
        "params": int(sum(p.numel() for p in model.parameters())),
        "tensors": len(tensors),
        **dict(extra or {}),
    }
    atomic_write_text(out / ARCHITECTURE, json.dumps(arch, indent=2, default=str) + "\n")
    if config is not None:

        atomic_write_text(out / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None))
    return arch


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Export a training checkpoint (or a run directory's newest one), as ``firefly export`` does."""

    ckpt = load_checkpoint(checkpoint)
    model = rebuild_model(ckpt)
    extra = {
        "dataset": ckpt.get("dataset"),
        "epoch": ckpt["epoch"],
        "num_growths": ckpt["num_growths"],
        "source_checkpoint": ckpt["path"],
        "torch_version": ckpt.get("torch_version"),
    }
    return export_model(model, out_dir, ckpt["model"], config=ckpt["config"], extra=extra)


def load_export(
    path: str | Path,
    build: Callable[[], nn.Module] | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild an exported model: its constructor (``build()``, or the registered model named in
    ``architecture.json``), its recorded growth replayed, then its weights. Returns the model in eval mode."""

    folder = Path(path)
    arch_path, weights_path = folder / ARCHITECTURE, folder / WEIGHTS
    for p in (arch_path, weights_path):
        if not p.is_file():
            raise ExportError(f"{folder}: no {p.name} here; write one with `firefly export RUN_DIR {folder}`")
    try:
        arch = json.loads(arch_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{arch_path}: unreadable ({' '.join(str(e).split())})") from None
    if build is not None:
        model = build()
    else:
        spec = arch.get("model")
        if not isinstance(spec, dict) or "name" not in spec:
            raise ExportError(f"{arch_path}: names no registered model; pass build= (your model's constructor)")

        model = build_model(spec["name"], **(spec.get("kwargs") or {}))
    history = arch.get("growth_history") or []
    fix = "pass as build the constructor of the exported model" if build is not None else "the export is damaged"
    try:
        replay_history(model, history)
    except (GrowthError, KeyError) as e:
        maker = "build()" if build is not None else f"model {arch['model']['name']!r}"
        raise ExportError(f"{arch_path}: growth history does not replay: {describe_misfit(e, maker)}; {fix}") from None
    setattr(model, HISTORY_ATTR, list(history))
    try:
        weights = load_file(str(weights_path), device=str(map_location))
    except Exception as e:  # safetensors' own error type: a truncated or overwritten file
        raise ExportError(
            f"{weights_path}: unreadable ({type(e).__name__}); export again with `firefly export RUN_DIR {folder}`"
        ) from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise ExportError(f"{weights_path}: weights do not fit the rebuilt model ({msg}); {fix}") from None
    return model.to(map_location).eval()
