"""Where a run computes: seeds, the device, and batches moved onto it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .config import ConfigError

__all__ = ["DeviceLoader", "loader_generator", "resolve_device", "seed_everything", "to_device"]


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else MPS if available, else CPU; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("train.device: 'mps' requested but MPS is not available; use auto or cpu")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` (a tensor, or a list/tuple of them) on `device`; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


class DeviceLoader:
    """Wrap a DataLoader: move batches to `device` and optionally stop after `max_batches`.

    Passed to growers so they see batches on the model's device; other attributes
    (``dataset``, ``batch_size``...) are forwarded to the wrapped loader.
    """

    def __init__(self, loader: Any, device: torch.device, max_batches: int | None = None) -> None:
        self.loader = loader
        self.device = device
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        n = len(self.loader)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "device", "max_batches"):
            raise AttributeError(name)
        return getattr(self.loader, name)


def loader_generator(loader: Any) -> torch.Generator | None:
    """The generator that shuffles `loader` (its state goes into every checkpoint), or None."""
    gen = getattr(loader, "generator", None)
    if gen is None:
        gen = getattr(getattr(loader, "sampler", None), "generator", None)
    return gen
