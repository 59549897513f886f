"""Offline dataset loading: ``load_dataset(name) -> DatasetBundle`` and seeded DataLoaders.

Nothing here downloads, except a Fashion-MNIST/MNIST found in no local folder (see download.py).
Image datasets are decoded once into uint8 tensors and transformed in batches
with torch ops (normalisation, train-only crop/flip augmentation), keeping CPU runs fast.
"""

from __future__ import annotations

from .datasets import Augment, DatasetBundle, TensorDataset
from .errors import DatasetError
from .idx import read_idx
from .loaders import make_loaders
from .registry import AUGMENT_PRESETS, DATA_DIR_ENV, available_datasets, load_dataset

__all__ = [
    "AUGMENT_PRESETS",
    "Augment",
    "DATA_DIR_ENV",
    "DatasetBundle",
    "DatasetError",
    "TensorDataset",
    "available_datasets",
    "load_dataset",
    "make_loaders",
    "read_idx",
]
