"""In-memory tensor datasets with batched, tensor-only transforms.

Every dataset here is decoded once into one tensor (uint8 for images), so an epoch costs only
indexing plus a few vectorised torch ops; DataLoader picks up ``__getitems__`` and transforms a
whole batch at a time instead of one image at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DatasetError

__all__ = ["Augment", "TensorDataset", "DatasetBundle", "channel_stats"]


@dataclass(frozen=True)
class Augment:
    """Train-time image augmentation on batches of float images ``(B, C, H, W)`` in [0, 1].

    ``crop_padding > 0``: zero-pad by that many pixels and take a random crop of the original size
    (torchvision's ``RandomCrop(size, padding=p)``). ``flip``: horizontal flip with probability 1/2.
    Randomness comes from torch's global RNG (seeded per worker by DataLoader).
    """

    crop_padding: int = 0
    flip: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise DatasetError(f"image augmentation needs (B, C, H, W) inputs, got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        p = int(self.crop_padding)
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,))
            ox = torch.randint(0, 2 * p + 1, (b,))
            rows = (oy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
            cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
            bi = torch.arange(b)[:, None, None, None]
            ci = torch.arange(x.shape[1])[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        if self.flip:
            mask = (torch.rand(b) < 0.5)[:, None, None, None]
            x = torch.where(mask, x.flip(-1), x)
        return x

    def describe(self) -> str:
        """Short human-readable form, stored in bundle metadata."""
        parts = []
        if self.crop_padding:
            parts.append(f"random-crop(pad={self.crop_padding})")
        if self.flip:
            parts.append("hflip")
        return "+".join(parts) or "none"


def channel_stats(inputs: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of ``(N, C, ...)`` inputs (uint8 scaled to [0, 1]), computed in chunks."""
    if inputs.shape[0] == 0:
        raise DatasetError("cannot compute normalisation statistics of an empty training set")
    c = inputs.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    scale = 255.0 if inputs.dtype == torch.uint8 else 1.0
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start : start + chunk].to(torch.float64) / scale
        x = x.transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-8)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def is_token_ids(inputs: Tensor) -> bool:
    """Integer inputs that are not uint8 images: indices (e.g. token ids) an embedding reads, never scaled."""
    return not inputs.is_floating_point() and not inputs.is_complex() and inputs.dtype not in (torch.uint8, torch.bool)


class TensorDataset(Dataset):
    """Inputs and targets held as whole tensors; yields ``(float input, target)`` pairs.

    ``inputs`` are uint8 images ``(N, C, H, W)`` (scaled to [0, 1] on access), float arrays, or integer indices
    (token ids: passed as int64, never scaled, augmented or normalised).
    On access: scale, then ``augment`` (train split only), then per-channel ``(x - mean) / std``.
    ``targets`` are int64 class labels, or float regression targets.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Augment | None = None,
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise DatasetError(
                f"inputs ({inputs.shape[0]}) and targets ({targets.shape[0]}) differ in length"
            )
        self.inputs = inputs
        self.targets = targets
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self.augment = augment
        self._mean_t: Tensor | None = None
        self._std_t: Tensor | None = None
        if self.mean is not None and self.std is not None:
            shape = (1, len(self.mean)) + (1,) * (inputs.dim() - 2)
            self._mean_t = torch.tensor(self.mean, dtype=torch.float32).reshape(shape)
            self._std_t = torch.tensor(self.std, dtype=torch.float32).reshape(shape)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def _transform(self, x: Tensor, augment: bool = True) -> Tensor:
        if is_token_ids(x):  # integer inputs other than uint8 images: indices (tokens) for an embedding, as they are
            return x.to(torch.int64)
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        if augment and self.augment is not None:
            x = self.augment(x)
        if self._mean_t is not None:
            x = (x - self._mean_t) / self._std_t
        return x

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Batched fetch used by DataLoader: one gather and one vectorised transform per batch."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._transform(self.inputs[idx])
        y = self.targets[idx]
        return list(zip(x.unbind(0), y.unbind(0)))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for dataset of size {n}")
        return self.__getitems__([i % n])[0]

    def subset(
        self, indices: Tensor | Sequence[int], *, augment: Augment | None | bool = True
    ) -> TensorDataset:
        """A new dataset holding the given rows; ``augment=True`` keeps this one's augmentation."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        aug = self.augment if augment is True else (None if augment is False else augment)
        return TensorDataset(self.inputs[idx], self.targets[idx], mean=self.mean, std=self.std, augment=aug)

    def as_tensors(self, augment: bool = False) -> tuple[Tensor, Tensor]:
        """The whole split as ``(inputs, targets)`` tensors, transformed (no augmentation by default)."""
        return self._transform(self.inputs, augment=augment), self.targets

    def __repr__(self) -> str:
        aug = self.augment.describe() if self.augment is not None else "none"
        return (
            f"TensorDataset(n={len(self)}, input={tuple(self.inputs.shape[1:])}, "
            f"dtype={self.inputs.dtype}, augment={aug})"
        )


@dataclass
class DatasetBundle:
    """Everything a training run needs about a dataset: the three splits plus shape/class info.

    ``num_classes == 0`` means regression (float targets). ``val`` is None unless ``val_fraction > 0``.
    ``meta`` records how the bundle was made (source path, normalisation, augmentation, sizes).
    """

    name: str
    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "classification" if self.num_classes > 0 else "regression"

    def example_inputs(self, n: int = 2) -> Tensor:
        """A small deterministic batch of (un-augmented) training inputs, e.g. for model analysis."""
        n = max(1, min(int(n), len(self.train)))
        return self.train._transform(self.train.inputs[:n], augment=False)
