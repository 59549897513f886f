"""Your own data as arrays in one file: a NumPy ``.npz`` (``np.savez``) or a ``torch.save`` file of tensors.

The file holds ``train_x``, ``train_y``, ``test_x`` and ``test_y`` (or ``x_train`` ... as Keras names them),
optionally ``num_classes`` and ``classes``. Inputs are ``(N, features)`` or ``(N, C, ...)``: uint8 inputs are
images scaled to [0, 1] on access, other integer inputs token ids (int64, never normalised), the rest floats
normalised with statistics of the training split (as for an ImageFolder tree). Integer targets are class
labels (``num_classes`` defaults to the largest label + 1); floating targets make a regression task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

KEYS = {"train_x": "x_train", "train_y": "y_train", "test_x": "x_test", "test_y": "y_test"}
SUFFIXES = (".npz", ".pt", ".pth")


def _read(path: Path) -> dict[str, Any]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: not a readable .npz file ({' '.join(str(e).split())[:120]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same one-line answer
        raise DatasetError(f"{path}: not a torch.save file of tensors ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: holds a {type(obj).__name__}; save a dict of tensors (train_x, train_y, ...)")
    return obj


def _tensor(value: Any, name: str, path: Path) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if t.dim() == 0:
        raise DatasetError(f"{path}: {name} is a scalar; it must hold one row per example")
    return t.detach().cpu()


def load_arrays(root: Path | None) -> dict[str, Any]:
    """Load the arrays file `root` (see module doc) as a dataset's raw splits."""
    if root is None:
        raise DatasetError(
            "dataset arrays: set data.root to a .npz or torch.save file holding train_x, train_y, test_x, test_y"
        )
    path = Path(root)
    if path.is_dir() or path.suffix not in SUFFIXES:
        what = "a folder" if path.is_dir() else repr(path.suffix or path.name)
        raise DatasetError(f"{path}: dataset arrays reads one .npz, .pt or .pth file, not {what}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    raw = _read(path)
    out: dict[str, Any] = {"source": str(path)}
    for key, alias in KEYS.items():
        name = key if key in raw else alias
        if name not in raw:
            held = ", ".join(sorted(map(str, raw))) or "nothing"
            raise DatasetError(f"{path}: no {key} (or {alias}); it holds {held}")
        out[key] = _tensor(raw[name], name, path)
    for split in ("train", "test"):
        x, y = out[f"{split}_x"], out[f"{split}_y"]
        if len(x) != len(y):
            raise DatasetError(f"{path}: {split}_x has {len(x)} rows but {split}_y has {len(y)}")
        if x.dim() < 2:
            raise DatasetError(f"{path}: {split}_x must be (N, features) or (N, C, ...), not shape {tuple(x.shape)}")
    if out["train_x"].shape[1:] != out["test_x"].shape[1:]:
        raise DatasetError(f"{path}: train_x rows are {tuple(out['train_x'].shape[1:])}, test_x rows "
                           f"{tuple(out['test_x'].shape[1:])}")
    for key in ("train_x", "test_x"):
        x = out[key]
        if x.is_floating_point() or x.dtype == torch.bool:
            out[key] = x.to(torch.float32)
        elif x.dtype != torch.uint8:  # integer: token ids for an embedding
            out[key] = x.to(torch.int64)
    ys = (out["train_y"], out["test_y"])
    if all(not y.is_floating_point() and not y.is_complex() for y in ys):
        out["train_y"], out["test_y"] = (y.to(torch.int64).reshape(-1) for y in ys)
        low = min(int(y.min()) for y in ys if len(y))
        high = max(int(y.max()) for y in ys if len(y))
        n = int(np.asarray(raw["num_classes"])) if "num_classes" in raw else high + 1
        if low < 0 or high >= n:
            raise DatasetError(f"{path}: class labels must lie in 0..{n - 1} (num_classes {n}); found {low}..{high}")
        out["num_classes"] = n
        if "classes" in raw:
            out["classes"] = tuple(str(c) for c in np.asarray(raw["classes"]).tolist())
    else:  # regression
        out["train_y"], out["test_y"] = (y.to(torch.float32) for y in ys)
        out["num_classes"] = 0
    return out
