"""Grown checkpoints that always reload: weights plus the structural growth history.

`save` writes the state_dict, the history and the tensor shapes atomically; `load` builds the
original model from its constructor, replays the history structurally (same edits, default
values), then loads the weights - so a grown architecture rebuilds without pickled classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import GrowthError
from ..io import atomic_save, load_torch_file
from ..plan import Plan
from .apply import HISTORY_ATTR, apply, growth_history
from .modules import attr_owners, rederive_attrs, snapshot_attrs


def replay_history(model: nn.Module, history: list[dict[str, Any]]) -> nn.Module:
    """Re-apply recorded growth to a freshly constructed `model` (structure only; load weights after)."""
    for record in history:
        apply(model, Plan.from_dict(record), verify=False)
    return model


def save(model: nn.Module, path: str, extra: dict[str, Any] | None = None) -> None:
    """Save weights + growth history + shapes (loadable with `torch.load(weights_only=True)`)."""
    atomic_save(
        {
            "format": "firefly-descent/1",
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "history": growth_history(model),
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "extra": extra or {},
        },
        path,
    )


def resize_to_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Fallback without history: give every tensor its recorded shape (width growth only)."""
    resized: list[str] = []
    for name, shape in shapes.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise GrowthError(
                f"checkpoint tensor {name!r} has no module in the model; it was grown deeper - "
                "load it with its growth history"
            ) from None
        store = module._parameters if attr in module._parameters else module._buffers
        old = store.get(attr)
        if old is None or list(old.shape) == list(shape):
            continue
        before = snapshot_attrs(module)
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        store[attr] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        rederive_attrs(module, before)
        resized.append(mod_name)
    for _, owner in attr_owners(model, list(dict.fromkeys(resized))):  # GPT-2 attention's split_size
        rederive_attrs(owner, snapshot_attrs(owner))
    return model


def load(path: str, build: Callable[[], nn.Module], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a grown model: `build()` the original, replay its history, load its weights."""
    if not os.path.exists(path):
        raise GrowthError(f"no checkpoint at {path}")
    ckpt = load_torch_file(path, map_location, GrowthError)
    if isinstance(ckpt, dict) and ckpt.get("format") == "firefly-descent-checkpoint":
        raise GrowthError(
            f"{path} is a training checkpoint of `firefly train`, not a firefly_descent.save file; export it with "
            "`firefly export RUN_DIR OUT_DIR` and load that with firefly_descent.load_export(OUT_DIR)"
        )
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise GrowthError(
            f"{path} is not a firefly-descent checkpoint (no state_dict); save it with firefly_descent.save"
        )
    model = build()
    try:
        if ckpt.get("history"):
            replay_history(model, ckpt["history"])
        else:
            resize_to_shapes(model, ckpt.get("shapes", {}))
        model.load_state_dict(ckpt["state_dict"])
    except (GrowthError, RuntimeError, KeyError) as e:
        fix = "pass as build the constructor of the model that was saved"
        raise GrowthError(f"{path}: {describe_misfit(e)}; {fix}") from None
    setattr(model, HISTORY_ATTR, list(ckpt.get("history", [])))
    return model


def describe_misfit(e: Exception, maker: str = "build()") -> str:
    """What a wrong constructor did: the engine's or torch's complaint on one line, without its advice
    ("re-analyse the model" is for plans made by hand, not for loading)."""
    detail = " ".join(str(e).split()) or type(e).__name__
    for advice in ("; the plan is stale - re-analyse the model", "; re-analyse the model"):
        detail = detail.replace(advice, "")
    return f"the model that {maker} makes does not fit the saved one ({detail[:200]})"
