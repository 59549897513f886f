"""Reference architectures for growth experiments, built only from standard `torch.nn` modules.

Every model is `torch.fx.symbolic_trace`-able (no data-dependent control flow, no
hard-coded device) so the growth analysis can read its graph, and every builder
takes `in_channels` (or `in_features`) and `num_classes`.

    >>> from firefly_descent.models import build_model
    >>> net = build_model("vgg19", widths=16, num_classes=10)   # the paper's start
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import replay_history
from ..engine.apply import HISTORY_ATTR
from ._common import init_weights
from .darts import DartsNetwork, darts_eval
from .mlp import MLP, ResidualBlock, ResidualMLP
from .mobilenet import MobileNetV1, MobileNetV1Stages, depthwise_separable
from .resnet import BasicBlock, ResNet, resnet18, resnet_cifar
from .transformer import Transformer, TransformerBlock
from .vgg import VGG, VGG_CONFIGS, vgg_stages

__all__ = [
    "MLP",
    "VGG",
    "VGG_CONFIGS",
    "BasicBlock",
    "DartsNetwork",
    "MobileNetV1",
    "MobileNetV1Stages",
    "ResNet",
    "ResidualBlock",
    "ResidualMLP",
    "Transformer",
    "TransformerBlock",
    "available_models",
    "build_model",
    "depthwise_separable",
    "import_builder",
    "model_spec",
    "register_model",
    "resnet18",
    "resnet_cifar",
    "vgg_stages",
]


def _mlp(
    in_features: int = 784,
    hidden: Sequence[int] | int = 256,
    num_classes: int = 10,
    depth: int | None = None,
    act: str = "relu",
    norm: str | None = None,
) -> nn.Module:
    return MLP(in_features, hidden, num_classes, depth=depth, act=act, norm=norm)


def _residual_mlp(
    in_features: int = 784,
    width: int = 128,
    num_classes: int = 10,
    depth: int = 2,
    hidden: int | None = None,
    act: str = "relu",
    norm: str | None = None,
) -> nn.Module:
    return ResidualMLP(in_features, width, num_classes, depth=depth, hidden=hidden, act=act, norm=norm)


def _vgg(config: str) -> Callable[..., nn.Module]:
    def build(
        in_channels: int = 3,
        num_classes: int = 10,
        widths: int | Sequence[int] | None = None,
        width_multiplier: float = 1.0,
        input_size: int = 32,
        classifier: str = "conv1x1",
        pool_to: int | None = None,
        max_pools: int | None = None,
        hidden: Sequence[int] = (),
    ) -> nn.Module:
        return VGG(
            config,
            in_channels,
            num_classes,
            widths,
            width_multiplier,
            input_size,
            classifier,
            pool_to,
            max_pools,
            hidden,
        )

    build.__doc__ = f"{config.upper()} with BatchNorm (see `VGG`)."
    return build


def _resnet_cifar(depth: int) -> Callable[..., nn.Module]:
    def build(
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        widths: Sequence[int] | None = None,
    ) -> nn.Module:
        return resnet_cifar(depth, in_channels, num_classes, width, widths)

    build.__doc__ = f"CIFAR ResNet-{depth} (see `resnet_cifar`)."
    return build


def _resnet18(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 64,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    return resnet18(in_channels, num_classes, width, widths)


def replayed_architecture(
    base: str = "mlp",
    base_kwargs: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    run: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """A grown model's final architecture, freshly initialised: the "trained from scratch" control.

    Builds `base(**base_kwargs)`, replays the structural growth `history` and re-initialises every layer.
    `run` reads all three from a training run directory (or one checkpoint file) instead. The replayed
    growth is not kept as history, so the new model is an ordinary (ungrown) model of that shape.
    """

    if run is not None:

        path = run
        if os.path.isdir(run):
            folder = os.path.join(run, "checkpoints")
            names = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
            if not names:
                raise ValueError(f"no checkpoint in {folder}; pass a run directory with checkpoints or a .pt file")
            path = os.path.join(folder, names[-1])

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        base, base_kwargs = ckpt["model"]["name"], dict(ckpt["model"]["kwargs"])
        history = list(ckpt.get("growth_history") or [])
    kwargs = {**(base_kwargs or {}), **overrides}
    model = build_model(base, **kwargs)
    replay_history(model, list(history or []))
    setattr(model, HISTORY_ATTR, [])
    for m in model.modules():
        if m is not model and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    init_weights(model)
    return model


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "residual-mlp": _residual_mlp,
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "vgg19": _vgg("vgg19"),
    "resnet20": _resnet_cifar(20),
    "resnet56": _resnet_cifar(56),
    "resnet18": _resnet18,
    "mobilenetv1": MobileNetV1,
    "mobilenetv1-stages": MobileNetV1Stages,
    "vgg-stages": vgg_stages,
    "transformer": Transformer,
    "replayed-architecture": replayed_architecture,
    "darts-eval": darts_eval,
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add a builder so configs and the CLI can refer to a user model by name."""
    _REGISTRY[_key(name)] = builder


def available_models() -> list[str]:
    """Names accepted by `build_model`, sorted."""
    return sorted(_REGISTRY)


def import_builder(path: str) -> Callable[..., nn.Module]:
    """The class or function named by an import path ``package.module:Name`` (``Name`` may be dotted).
    A module not importable as is is looked for in the current directory too, as ``python -m`` would."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"model {path!r}: an import path is 'package.module:ClassOrFunction'")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0] or os.getcwd() in sys.path:
            raise ValueError(f"model {path!r}: cannot import {module!r} ({e})") from None
        sys.path.append(os.getcwd())
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e2:
            raise ValueError(
                f"model {path!r}: cannot import {module!r} ({e2}); put its folder on PYTHONPATH or run from it"
            ) from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {path!r}: {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {path!r}: {attr!r} is a {type(obj).__name__}, not a class or function")
    return obj


def _builder(name: str) -> Callable[..., nn.Module]:
    key = _key(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if ":" in name:
        return import_builder(name.strip())
    raise ValueError(f"unknown model {name!r}; available: {available_models()}, or your own as 'package.module:Class'")


def build_model(name: str, **kw: Any) -> nn.Module:
    """Build a reference model by name (case-insensitive, `_` ≡ `-`), or a user's model by import path
    (``my_nets:Net``: a class or function, called with the keyword options).

    Unknown names or options raise a `ValueError`/`TypeError` naming the valid ones,
    so config typos fail loudly instead of silently using defaults.
    """
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kw) - set(params))
        if bad:
            raise TypeError(f"model {name!r} got unknown options {bad}; valid: {sorted(params)}")
    model = builder(**kw)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_spec(name: str) -> dict[str, Any]:
    """The keyword options of a model and their defaults (for `firefly models` listings and configs)."""
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(_builder(name)).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
