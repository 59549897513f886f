"""IDX files (the MNIST / Fashion-MNIST format), parsed with numpy + gzip so nothing downloads.

Accepts gzip-compressed or raw files (detected from the gzip magic, not the file name), in either
the flat layout (``/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz``) or torchvision's
``<root>/FashionMNIST/raw/`` layout.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError, DatasetNotFoundError, paths_text

__all__ = ["read_idx", "find_idx_files", "load_idx_dataset", "IdxSpec", "IDX_STEMS"]

# IDX type byte -> numpy big-endian dtype
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DatasetError(
                f"{path} is a truncated or corrupt gzip file ({e}); re-download or re-install it"
            ) from e
    return raw


def read_idx(path: str | os.PathLike[str], *, expect_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (optionally gzipped), checking its magic number and exact byte size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path} is truncated: {len(data)} bytes, too short for an IDX header")
    zero, type_byte, ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or type_byte not in _IDX_DTYPES or ndim == 0:
        want = f"0x000008{expect_ndim:02x}" if expect_ndim else "0x000008NN"
        raise DatasetError(
            f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} (expected {want})"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise DatasetError(
            f"{path} has bad magic 0x{data[:4].hex()}: {ndim}-d data, expected {expect_ndim}-d"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: header needs {header} bytes, file has {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_byte]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DatasetError(
            f"{path} is truncated: header says shape {dims} ({expected} bytes) "
            f"but the data has {len(data)} bytes"
        )
    if len(data) > expected:
        raise DatasetError(
            f"{path} is malformed: header says shape {dims} ({expected} bytes) "
            f"but the data has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


@dataclass(frozen=True)
class IdxSpec:
    """How to find and describe one IDX dataset (MNIST-style)."""

    title: str
    default_roots: tuple[str, ...]
    torchvision_dir: str
    install_hint: str
    num_classes: int = 10
    debian_package: str | None = None  # installs the IDX files under /usr/share/datasets/<default root>


def _candidate_dirs(root: Path, spec: IdxSpec) -> list[Path]:
    return [root, root / spec.torchvision_dir / "raw"]


def _find_in(d: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for key, stem in IDX_STEMS.items():
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                found[key] = d / name
                break
    return found


def find_idx_files(roots: list[Path], spec: IdxSpec) -> dict[str, Path]:
    """Find the four IDX files in any candidate directory; DatasetError naming every place tried."""
    looked: list[Path] = []
    partial: tuple[Path, dict[str, Path]] | None = None
    for root in roots:
        for d in _candidate_dirs(root, spec):
            looked.append(d)
            found = _find_in(d)
            if len(found) == len(IDX_STEMS):
                return found
            if found and partial is None:
                partial = (d, found)
    wanted = ", ".join(f"{s}[.gz]" for s in IDX_STEMS.values())
    if partial is not None:
        d, found = partial
        missing = ", ".join(f"{IDX_STEMS[k]}[.gz]" for k in IDX_STEMS if k not in found)
        raise DatasetError(f"{spec.title} incomplete in {d}: missing {missing}; {spec.install_hint}")
    raise DatasetNotFoundError(
        f"{spec.title} not found in {paths_text(looked)} (looked for {wanted}); {spec.install_hint}"
    )


def load_idx_dataset(roots: list[Path], spec: IdxSpec) -> dict[str, object]:
    """Read train/test images and labels as uint8 ``(N, 1, H, W)`` / int64 ``(N,)`` tensors."""
    files = find_idx_files(roots, spec)
    out: dict[str, object] = {"source": str(files["train_images"].parent)}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], expect_ndim=3)
        labels = read_idx(files[f"{split}_labels"], expect_ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DatasetError(
                f"{files[f'{split}_images']} / {files[f'{split}_labels']}: expected unsigned-byte IDX data"
            )
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{files[f'{split}_images']} has {images.shape[0]} images but "
                f"{files[f'{split}_labels']} has {labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) >= spec.num_classes:
            raise DatasetError(
                f"{files[f'{split}_labels']} has label {int(labels.max())}, expected < {spec.num_classes}"
            )
        out[f"{split}_x"] = torch.from_numpy(images).unsqueeze(1)
        out[f"{split}_y"] = torch.from_numpy(labels.astype(np.int64))
    return out
