"""CIFAR-10 / CIFAR-100 from torchvision's on-disk pickle layout, read without torchvision.

``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``. The pickles are loaded with an unpickler that only
accepts plain containers and numpy arrays, so a stray pickle cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError, paths_text

__all__ = ["load_cifar", "CIFAR_LAYOUTS"]

CIFAR_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "num_classes": 10,
    },
    "cifar100": {
        "title": "CIFAR-100",
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "num_classes": 100,
    },
}

_ALLOWED_NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "frombuffer"}


class _SafeUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction is allowed beyond plain Python containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == "numpy" or module.startswith("numpy.")) and name in _ALLOWED_NUMPY:
            return super().find_class(module, name)
        if (module, name) in {("builtins", "bytearray"), ("builtins", "bytes"), ("_codecs", "encode")}:
            return super().find_class(module, name)  # bytes payloads as pickled by Python 3, protocol 2
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a malformed file
        kind = "truncated" if isinstance(e, EOFError) else "malformed"
        raise DatasetError(f"{path} is {kind}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} is malformed: expected a pickled dict, got {type(obj).__name__}")
    # Real files have bytes keys; files written by Python 3 code may have str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _find_dir(roots: list[Path], layout: dict[str, Any]) -> Path:
    needed = layout["train"] + layout["test"]
    looked: list[Path] = []
    for root in roots:
        for d in (root / layout["dir"], root):
            looked.append(d)
            if all((d / f).is_file() for f in needed):
                return d
    files = ", ".join(needed + [layout["meta"]])
    raise DatasetError(
        f"{layout['title']} not found in {paths_text(looked)} (looked for {layout['dir']}/ with {files}); "
        f"it cannot be downloaded here: copy torchvision's {layout['dir']}/ folder under root=… "
        f"or use name='imagefolder' with root=<dir with train/<class>/*.png>"
    )


def _labels(batch: dict[str, Any], path: Path, label_key: str, n: int, num_classes: int) -> np.ndarray:
    if label_key not in batch:
        raise DatasetError(f"{path} is malformed: no '{label_key}' entry (keys: {', '.join(sorted(batch))})")
    y = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if y.shape[0] != n:
        raise DatasetError(f"{path} is malformed: {n} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(
            f"{path} is malformed: labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}"
        )
    return y


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    if "data" not in batch:
        raise DatasetError(f"{path} is malformed: no 'data' entry (keys: {', '.join(sorted(batch))})")
    try:
        x = np.asarray(batch["data"], dtype=np.uint8)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path} is malformed: 'data' is not a uint8 array ({e})") from e
    if x.ndim == 2 and x.shape[1] == 3 * 32 * 32:
        x = x.reshape(-1, 3, 32, 32)
    if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
        raise DatasetError(f"{path} is malformed: 'data' has shape {x.shape}, expected (N, 3072)")
    return x, _labels(batch, path, label_key, x.shape[0], num_classes)


def load_cifar(name: str, roots: list[Path], *, label_mode: str = "fine") -> dict[str, Any]:
    """Read a CIFAR variant as uint8 ``(N, 3, 32, 32)`` images and int64 labels, plus class names."""
    layout = CIFAR_LAYOUTS[name]
    d = _find_dir(roots, layout)
    num_classes = layout["num_classes"]
    label_key = "labels"
    names_key = "label_names"
    if name == "cifar100":
        if label_mode not in ("fine", "coarse"):
            raise DatasetError(f"cifar100 label_mode must be 'fine' or 'coarse', got {label_mode!r}")
        label_key = f"{label_mode}_labels"
        names_key = f"{label_mode}_label_names"
        num_classes = 100 if label_mode == "fine" else 20
    out: dict[str, Any] = {"source": str(d), "num_classes": num_classes}
    for split in ("train", "test"):
        parts = [_read_batch(d / f, label_key, num_classes) for f in layout[split]]
        out[f"{split}_x"] = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
        out[f"{split}_y"] = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    classes: tuple[str, ...] | None = None
    meta_path = d / layout["meta"]
    if meta_path.is_file():
        meta = _load_pickle(meta_path)
        names = meta.get(names_key)
        if names is not None and len(names) == num_classes:
            classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    out["classes"] = classes
    return out
