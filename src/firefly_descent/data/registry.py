"""``load_dataset``: one entry point from a dataset name to train/val/test splits, all offline."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .arrays import load_arrays
from .cifar import load_cifar
from .datasets import Augment, DatasetBundle, TensorDataset, channel_stats, is_token_ids
from .download import download_cache_dir, download_idx, install_debian_package
from .errors import DatasetError, DatasetNotFoundError
from .idx import IdxSpec, load_idx_dataset
from .imagefolder import load_imagefolder
from .synthetic import make_digits, make_mnist1d, make_teacher_student, make_two_spirals

__all__ = ["load_dataset", "available_datasets", "AUGMENT_PRESETS", "DATA_DIR_ENV"]

DATA_DIR_ENV = "FIREFLY_DATA_DIR"
_SYSTEM_DIR = Path("/usr/share/datasets")

AUGMENT_PRESETS: dict[str, Augment | None] = {
    "none": None,
    "crop-flip": Augment(crop_padding=4, flip=True),
    "crop": Augment(crop_padding=4, flip=False),
    "flip": Augment(crop_padding=0, flip=True),
}

FASHION_MNIST = IdxSpec(
    title="Fashion-MNIST",
    default_roots=("fashion-mnist",),
    torchvision_dir="FashionMNIST",
    install_hint=(
        "install it with `apt-get install dataset-fashion-mnist` or pass root=… pointing at the IDX files "
        "(or at a folder holding torchvision's FashionMNIST/raw/)"
    ),
    debian_package="dataset-fashion-mnist",
)
MNIST = IdxSpec(
    title="MNIST",
    default_roots=("mnist",),
    torchvision_dir="MNIST",
    install_hint=(
        "pass root=… pointing at the MNIST IDX files (or at a folder holding torchvision's MNIST/raw/)"
    ),
)


def _default_roots(subdirs: Sequence[str]) -> list[Path]:
    """Where to look when ``root`` is None: $FIREFLY_DATA_DIR, /usr/share/datasets[/<name>], ./data."""
    roots: list[Path] = []
    env = os.environ.get(DATA_DIR_ENV)
    bases = ([Path(env).expanduser()] if env else []) + [_SYSTEM_DIR]
    for base in bases:
        roots.extend(base / s for s in subdirs)
        roots.append(base)
    roots.append(Path.cwd() / "data")
    roots.append(download_cache_dir())  # where a previous download left the files
    return roots


def _roots(root: str | os.PathLike[str] | None, subdirs: Sequence[str]) -> list[Path]:
    return [Path(root).expanduser()] if root is not None else _default_roots(subdirs)


def _load_idx_or_download(root: Path | None, spec: IdxSpec) -> dict[str, Any]:
    """Read the IDX files; with no explicit ``root`` and no local copy, download them (see data/download.py)."""
    try:
        return load_idx_dataset(_roots(root, spec.default_roots), spec)
    except DatasetNotFoundError as e:
        if root is not None:
            raise
        if install_debian_package(spec):  # root with apt-get: Debian's package, then look again
            with contextlib.suppress(DatasetNotFoundError):
                return load_idx_dataset(_roots(None, spec.default_roots), spec)
        return load_idx_dataset([download_idx(spec, e)], spec)


def _load_fashion(root: Path | None) -> dict[str, Any]:
    out = _load_idx_or_download(root, FASHION_MNIST)
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")  # fmt: skip
    return {**out, "num_classes": 10, "classes": classes}


def _load_mnist(root: Path | None) -> dict[str, Any]:
    out = _load_idx_or_download(root, MNIST)
    return {**out, "num_classes": 10, "classes": tuple(str(i) for i in range(10))}


def _load_cifar10(root: Path | None) -> dict[str, Any]:
    return load_cifar("cifar10", _roots(root, ("cifar10",)))


def _load_cifar100(root: Path | None, label_mode: str = "fine") -> dict[str, Any]:
    return load_cifar("cifar100", _roots(root, ("cifar100",)), label_mode=label_mode)


def _load_imagefolder(
    root: Path | None,
    train_dir: str = "train",
    test_dir: str | None = None,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    if root is None:
        raise DatasetError(
            "imagefolder needs root=… : a folder holding train/<class>/*.png and test/<class>/*.png"
        )
    return load_imagefolder(
        Path(root).expanduser(),
        train_dir=train_dir,
        test_dir=test_dir,
        image_size=image_size,
        channels=channels,
    )


def _ignore_root(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def wrapped(root: Path | None, **kw: Any) -> dict[str, Any]:
        return fn(**kw)

    wrapped.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return wrapped


@dataclass(frozen=True)
class _Spec:
    load: Callable[..., dict[str, Any]]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    auto_stats: bool = False  # compute mean/std from the training split
    default_augment: str = "none"


_REGISTRY: dict[str, _Spec] = {
    "fashion-mnist": _Spec(_load_fashion, (0.2860,), (0.3530,)),
    "mnist": _Spec(_load_mnist, (0.1307,), (0.3081,)),
    "cifar10": _Spec(
        _load_cifar10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), default_augment="crop-flip"
    ),
    "cifar100": _Spec(
        _load_cifar100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), default_augment="crop-flip"
    ),
    "imagefolder": _Spec(_load_imagefolder, auto_stats=True),
    "arrays": _Spec(load_arrays, auto_stats=True),
    "mnist1d": _Spec(_ignore_root(make_mnist1d)),
    "digits": _Spec(_ignore_root(make_digits)),
    "teacher-student": _Spec(_ignore_root(make_teacher_student)),
    "two-spirals": _Spec(_ignore_root(make_two_spirals)),
}

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "image-folder": "imagefolder",
    "npz": "arrays",
    "mnist-1d": "mnist1d",
    "teacherstudent": "teacher-student",
    "spirals": "two-spirals",
    "twospirals": "two-spirals",
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (aliases such as ``cifar-10`` also work)."""
    return list(_REGISTRY)


def dataset_options(name: str) -> dict[str, Any]:
    """A dataset's own options (``data.kwargs``) and their defaults, for `firefly datasets`."""
    params = inspect.signature(_REGISTRY[_canonical(name)].load).parameters
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in params.values()
        if p.name != "root" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return key


def _resolve_augment(
    augment: str | Augment | None, spec: _Spec, name: str, input_shape: tuple[int, ...]
) -> Augment | None:
    if augment is None:
        return None
    if isinstance(augment, Augment):
        aug: Augment | None = augment
    elif isinstance(augment, str):
        key = augment.strip().lower().replace("_", "-")
        if key == "default":
            key = spec.default_augment
        if key not in AUGMENT_PRESETS:
            raise DatasetError(
                f"unknown augment {augment!r}; use None, 'default' or one of {', '.join(AUGMENT_PRESETS)}"
            )
        aug = AUGMENT_PRESETS[key]
    else:
        raise DatasetError(f"augment must be a preset name, an Augment or None, got {type(augment).__name__}")
    if aug is not None and len(input_shape) != 3:
        raise DatasetError(f"augment {augment!r} applies to images; {name} inputs have shape {input_shape}")
    return aug


def _check_count(label: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise DatasetError(f"{label} must be a positive int or None, got {value!r}")
    return int(value)


def _split(
    n: int, val_fraction: float, train_subset: int | None, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Seeded train/val indices: the train pool is the first ``train_subset`` of a permutation, and
    the first ``round(val_fraction * pool)`` of the pool become validation. None means "all, no copy"."""
    if train_subset is None and val_fraction == 0:
        return None, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    pool = perm if train_subset is None else perm[: min(train_subset, n)]
    n_val = int(round(val_fraction * len(pool)))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= len(pool):
        raise DatasetError(f"val_fraction={val_fraction} leaves no training data out of {len(pool)} examples")
    return pool[n_val:].sort().values, pool[:n_val].sort().values


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: str | Augment | None = "default",
    **kw: Any,
) -> DatasetBundle:
    """Load a dataset from local files (or generate it) as train/val/test tensor datasets.

    Nothing is downloaded, except Fashion-MNIST/MNIST with no ``root`` when no local folder holds them
    (torchvision's download into a cache; see `firefly_descent.data.download`).
    ``seed`` fixes the validation split and the subsets (and never the data itself; generated datasets
    take ``data_seed``). ``train_subset`` first restricts training
    to that many seeded examples, then ``val_fraction`` of them become the validation split; the
    test set is subset independently by ``test_subset``. ``augment="default"`` applies the dataset's
    usual train-time augmentation (CIFAR: random crop with padding 4 + horizontal flip; others: none);
    validation and test are never augmented. Extra keywords: ``normalize=False`` keeps raw [0, 1]
    inputs; ``mean=``/``std=`` override the statistics; dataset options (``image_size``,
    ``train_dir``, ``num_samples``, ``in_dim``, ...) go to that dataset's loader.
    Raises :class:`DatasetError` (a ``ValueError``) with a one-line message on any problem.
    """
    key = _canonical(name)
    spec = _REGISTRY[key]
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_subset = _check_count("train_subset", train_subset)
    test_subset = _check_count("test_subset", test_subset)
    normalize = bool(kw.pop("normalize", True))
    mean_kw, std_kw = kw.pop("mean", None), kw.pop("std", None)
    if (mean_kw is None) != (std_kw is None):
        raise DatasetError("pass both mean= and std= (or neither)")

    params = inspect.signature(spec.load).parameters
    accepted = [p for p in params if p != "root" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kw) - set(accepted))
        if unknown:
            raise DatasetError(
                f"unknown option(s) {', '.join(unknown)} for dataset {key}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
    raw = spec.load(Path(root).expanduser() if root is not None else None, **kw)

    train_x, train_y = raw["train_x"], raw["train_y"]
    test_x, test_y = raw["test_x"], raw["test_y"]
    input_shape = tuple(int(s) for s in train_x.shape[1:])
    aug = _resolve_augment(augment, spec, key, input_shape)

    train_idx, val_idx = _split(len(train_x), float(val_fraction), train_subset, seed)
    if train_idx is not None:
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    if test_subset is not None and test_subset < len(test_x):
        g = torch.Generator().manual_seed(int(seed) + 1_000_003)
        t_idx = torch.randperm(len(test_x), generator=g)[:test_subset].sort().values
        test_x, test_y = test_x[t_idx], test_y[t_idx]

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    if not normalize or is_token_ids(train_x):  # token ids are indices, not values
        mean = std = None
    elif mean_kw is not None:
        mean, std = tuple(float(m) for m in mean_kw), tuple(float(s) for s in std_kw)
        if len(mean) != input_shape[0] or len(std) != input_shape[0]:
            raise DatasetError(
                f"mean/std need {input_shape[0]} value(s) (one per channel), got {len(mean)}/{len(std)}"
            )
    elif spec.auto_stats:
        mean, std = channel_stats(train_x)
    else:
        mean, std = spec.mean, spec.std

    train = TensorDataset(train_x, train_y, mean=mean, std=std, augment=aug)
    val = TensorDataset(val_x, val_y, mean=mean, std=std) if val_idx is not None and len(val_idx) else None
    test = TensorDataset(test_x, test_y, mean=mean, std=std)

    meta: dict[str, Any] = {
        "source": raw.get("source"),
        "mean": mean,
        "std": std,
        "augment": aug.describe() if aug is not None else "none",
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "train_subset": train_subset,
        "test_subset": test_subset,
        "sizes": {"train": len(train), "val": len(val) if val is not None else 0, "test": len(test)},
        "options": dict(kw),
    }
    if "teacher" in raw:
        meta["teacher"] = raw["teacher"]
    return DatasetBundle(
        name=key,
        train=train,
        val=val,
        test=test,
        num_classes=int(raw["num_classes"]),
        input_shape=input_shape,
        classes=raw.get("classes"),
        meta=meta,
    )
