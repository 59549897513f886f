"""Datasets generated in code: MNIST-1D, scikit-learn digits, teacher-student regression, two spirals.

Each is generated from its own ``data_seed`` (not the run's ``seed``), so every run sees the same
dataset and only splits/subsets/shuffling change with ``seed``. Generation never touches the
global RNGs: MNIST-1D's generator seeds ``random``/``numpy.random`` itself, so their state is restored.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

__all__ = ["make_mnist1d", "make_digits", "make_teacher_student", "make_two_spirals"]


def make_mnist1d(*, num_samples: int = 5000, data_seed: int = 42, **kw: Any) -> dict[str, Any]:
    """MNIST-1D generated locally (never its download path): float ``(N, 1, 40)`` signals, 10 classes.

    Defaults are the canonical ones (5000 samples, 80/20 split, seed 42); other
    ``mnist1d.data.get_dataset_args()`` fields (``train_split``, ``shuffle_seq``, ...) pass through ``kw``.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - mnist1d is a declared dependency
        raise DatasetError(f"mnist1d is not installed ({e}); install it with `pip install mnist1d`") from e
    args = get_dataset_args()
    known = set(vars(args)) - {"url"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise DatasetError(
            f"unknown mnist1d option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if num_samples < 10:
        raise DatasetError(f"mnist1d num_samples must be at least 10 (one per class), got {num_samples}")
    args.num_samples = int(num_samples)
    args.seed = int(data_seed)
    for k, v in kw.items():
        setattr(args, k, v)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "source": f"mnist1d.make_dataset(num_samples={args.num_samples}, seed={args.seed})",
        "train_x": torch.from_numpy(np.asarray(d["x"], dtype=np.float32)).unsqueeze(1),
        "train_y": torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
        "test_x": torch.from_numpy(np.asarray(d["x_test"], dtype=np.float32)).unsqueeze(1),
        "test_y": torch.from_numpy(np.asarray(d["y_test"], dtype=np.int64)),
        "num_classes": 10,
        "classes": tuple(str(i) for i in range(10)),
    }


def make_digits(*, data_seed: int = 0, test_fraction: float = 0.2) -> dict[str, Any]:
    """scikit-learn's 8x8 digits scaled to [0, 1], shape ``(1, 8, 8)``, fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"digits test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=data_seed, stratify=y
    )
    return {
        "source": "sklearn.datasets.load_digits()",
        "train_x": torch.from_numpy(x_tr),
        "train_y": torch.from_numpy(y_tr),
        "test_x": torch.from_numpy(x_te),
        "test_y": torch.from_numpy(y_te),
        "num_classes": 10,
        "classes": tuple(str(i) for i in range(10)),
    }


def make_teacher_student(
    *,
    in_dim: int = 10,
    hidden: int = 16,
    out_dim: int = 1,
    n_train: int = 2048,
    n_test: int = 512,
    noise: float = 0.0,
    activation: str = "relu",
    data_seed: int = 0,
) -> dict[str, Any]:
    """Regression on a random one-hidden-layer teacher MLP: ``y = W2 act(W1 x + b1) + b2 + noise * eps``.

    Inputs are standard normal ``(in_dim,)``; targets float ``(out_dim,)``. The teacher's weights are
    returned under ``"teacher"`` so tests of growth can compare against the true width ``hidden``.
    """
    acts = {"relu": torch.relu, "tanh": torch.tanh}
    if activation not in acts:
        raise DatasetError(f"teacher-student activation must be one of {', '.join(acts)}, got {activation!r}")
    for k, v in {
        "in_dim": in_dim,
        "hidden": hidden,
        "out_dim": out_dim,
        "n_train": n_train,
        "n_test": n_test,
    }.items():
        if int(v) < 1:
            raise DatasetError(f"teacher-student {k} must be >= 1, got {v}")
    if noise < 0:
        raise DatasetError(f"teacher-student noise must be >= 0, got {noise}")
    g = torch.Generator().manual_seed(int(data_seed))
    w1 = torch.randn(hidden, in_dim, generator=g) / math.sqrt(in_dim)
    b1 = 0.1 * torch.randn(hidden, generator=g)
    w2 = torch.randn(out_dim, hidden, generator=g) / math.sqrt(hidden)
    b2 = 0.1 * torch.randn(out_dim, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, in_dim, generator=g)
        y = acts[activation](x @ w1.T + b1) @ w2.T + b2
        if noise > 0:
            y = y + noise * torch.randn(n, out_dim, generator=g)
        return x, y

    x_tr, y_tr = sample(int(n_train))
    x_te, y_te = sample(int(n_test))
    return {
        "source": f"teacher-student(in_dim={in_dim}, hidden={hidden}, out_dim={out_dim}, seed={data_seed})",
        "train_x": x_tr,
        "train_y": y_tr,
        "test_x": x_te,
        "test_y": y_te,
        "num_classes": 0,
        "classes": None,
        "teacher": {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "activation": activation},
    }


def make_two_spirals(
    *, n_train: int = 1000, n_test: int = 1000, noise: float = 0.05, turns: float = 1.5, data_seed: int = 0
) -> dict[str, Any]:
    """Two interleaved spirals in the plane, balanced classes 0/1, inputs ``(2,)`` roughly in [-1, 1]."""
    if int(n_train) < 2 or int(n_test) < 2:
        raise DatasetError(f"two-spirals needs n_train, n_test >= 2, got {n_train}, {n_test}")
    g = torch.Generator().manual_seed(int(data_seed))

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        y = y[torch.randperm(n, generator=g)]
        r = torch.rand(n, generator=g).sqrt()  # uniform density along the arc
        theta = r * turns * 2 * math.pi + y * math.pi
        x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
        x = x + noise * torch.randn(n, 2, generator=g)
        return x.float(), y.long()

    x_tr, y_tr = sample(int(n_train))
    x_te, y_te = sample(int(n_test))
    return {
        "source": f"two-spirals(turns={turns}, noise={noise}, seed={data_seed})",
        "train_x": x_tr,
        "train_y": y_tr,
        "test_x": x_te,
        "test_y": y_te,
        "num_classes": 2,
        "classes": ("0", "1"),
    }
