"""ImageFolder trees (``<root>/train/<class>/*.png``, ``<root>/test/<class>/*``), decoded once.

Every image is decoded with Pillow a single time at load into one uint8 tensor, so epochs never
touch PIL. Classes come from the train directory (sorted), as in torchvision's ``ImageFolder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError, paths_text

__all__ = ["load_imagefolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _list_split(split_dir: Path, classes: Sequence[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise DatasetError(f"no class folders in {split_dir} (expected {split_dir}/<class>/*.png)")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DatasetError(
            f"{split_dir} has class folder(s) {', '.join(unknown[:5])} that are not in the train folder"
        )
    items: list[tuple[Path, int]] = []
    for c in found:
        files = sorted(
            p for p in (split_dir / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        items.extend((p, index[c]) for p in files)
    if not items:
        raise DatasetError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) under {split_dir}/<class>/")
    return list(classes), items


def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise DatasetError(f"image_size must be an int or (height, width), got {image_size!r}")
    return hw  # type: ignore[return-value]


def _decode(items: list[tuple[Path, int]], channels: int, size_hw: tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    arrays: list[np.ndarray] = []
    first_shape: tuple[int, ...] | None = None
    for path, _ in items:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if size_hw is not None and im.size != (size_hw[1], size_hw[0]):
                    im = im.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from e
        if first_shape is None:
            first_shape = a.shape
        elif a.shape != first_shape:
            raise DatasetError(
                f"images differ in size ({items[0][0]} is {first_shape[1]}x{first_shape[0]}, "
                f"{path} is {a.shape[1]}x{a.shape[0]}); resize them with image_size=N "
                "(in a run config: data.kwargs.image_size: N)"
            )
        arrays.append(a)
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def _detect_channels(items: list[tuple[Path, int]]) -> int:
    from PIL import Image, UnidentifiedImageError

    for path, _ in items:
        try:
            with Image.open(path) as im:
                if im.mode not in _GREY_MODES:
                    return 3
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
    return 1


# the last decoded tree, kept for the process: a benchmark runs many trainings on the same data, and decoding
# 60,000 JPEGs costs ~45 s each time. Keyed by the folders' paths and modification times (adding or removing
# a file changes its class folder's mtime). Callers index into the tensors (copies) and never write to them.
_LAST: dict[tuple[Any, ...], dict[str, Any]] = {}


def _tree_key(root: Path, splits: Sequence[Path], *options: Any) -> tuple[Any, ...]:
    dirs = [d for split in splits for d in [split, *sorted(p for p in split.iterdir() if p.is_dir())]]
    return (str(root.resolve()), *options, tuple((str(d), d.stat().st_mtime_ns) for d in dirs))


def load_imagefolder(
    root: Path,
    *,
    train_dir: str = "train",
    test_dir: str | None = None,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    """Decode a train/test ImageFolder tree into uint8 ``(N, C, H, W)`` tensors and int64 labels.

    ``test_dir`` defaults to ``test`` (falling back to ``val``); ``channels`` defaults to 1 when every
    image is greyscale, else 3; ``image_size`` resizes (bilinear) and is required if sizes differ.
    """
    train_path = root / train_dir
    test_candidates = [test_dir] if test_dir is not None else ["test", "val"]
    test_paths = [root / t for t in test_candidates]
    if not train_path.is_dir():
        raise DatasetError(
            f"ImageFolder tree not found: {train_path} is not a directory "
            f"(expected {root}/{train_dir}/<class>/*.png and "
            f"{root}/{test_candidates[0]}/<class>/*.png; set train_dir=/test_dir= for other split names)"
        )
    test_path = next((p for p in test_paths if p.is_dir()), None)
    if test_path is None:
        raise DatasetError(
            f"ImageFolder test split not found: looked in {paths_text(test_paths)} "
            f"(expected <split>/<class>/*.png; pass test_dir=… for another name)"
        )
    key = _tree_key(root, [train_path, test_path], train_dir, test_dir, image_size, channels)
    if key in _LAST:
        return dict(_LAST[key])
    classes, train_items = _list_split(train_path, None)
    _, test_items = _list_split(test_path, classes)
    if channels is None:
        channels = _detect_channels(train_items + test_items)
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels!r}")
    size_hw = _size_hw(image_size)
    train_x = _decode(train_items, channels, size_hw)
    test_x = _decode(test_items, channels, size_hw)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"train images in {train_path} are {tuple(train_x.shape[2:])} but test images in {test_path} are "
            f"{tuple(test_x.shape[2:])}; resize them with image_size=N (in a run config: data.kwargs.image_size: N)"
        )
    out = {
        "source": str(root),
        "train_x": train_x,
        "train_y": torch.tensor([c for _, c in train_items], dtype=torch.int64),
        "test_x": test_x,
        "test_y": torch.tensor([c for _, c in test_items], dtype=torch.int64),
        "classes": tuple(classes),
        "num_classes": len(classes),
    }
    _LAST.clear()
    _LAST[key] = out
    return dict(out)
