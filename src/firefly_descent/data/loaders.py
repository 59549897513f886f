"""DataLoaders over a :class:`DatasetBundle`, with seeded shuffling so runs repeat exactly."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .datasets import DatasetBundle
from .errors import DatasetError

__all__ = ["make_loaders"]


def make_loaders(
    bundle: DatasetBundle,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader | None, DataLoader]:
    """``(train_loader, val_loader or None, test_loader)``.

    The train loader shuffles with its own ``torch.Generator`` seeded by ``seed``, so the batch order
    (and, with workers, each worker's augmentation seed) depends only on ``seed``; with
    ``num_workers=0`` augmentation draws from torch's global RNG, so seed it too for exact repeats.
    Evaluation loaders keep dataset order and use ``eval_batch_size`` (default ``batch_size``).
    """
    if int(batch_size) < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    eval_bs = int(eval_batch_size) if eval_batch_size is not None else int(batch_size)
    if eval_bs < 1:
        raise DatasetError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    common = {"num_workers": int(num_workers), "persistent_workers": int(num_workers) > 0}
    train = DataLoader(
        bundle.train,
        batch_size=int(batch_size),
        shuffle=True,
        generator=torch.Generator().manual_seed(int(seed)),
        drop_last=drop_last,
        **common,
    )
    val = (
        DataLoader(bundle.val, batch_size=eval_bs, shuffle=False, **common)
        if bundle.val is not None
        else None
    )
    test = DataLoader(bundle.test, batch_size=eval_bs, shuffle=False, **common)
    return train, val, test
