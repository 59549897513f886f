"""Mixed precision, ``torch.compile`` and ``channels_last`` for the training loop.

Autocast only wraps the training and evaluation forward passes: the parameters stay fp32, and
growth (the grower's statistics, the engine's edits, BatchNorm calibration) runs outside autocast,
so growth decisions are made in fp32 whatever ``train.precision`` says.

``train.compile`` wraps the forward module with `torch.compile`; growth replaces parameters and
modules, so the runtime compiles a fresh wrapper after every growth (`compile_module`). A backend
that cannot work here (no C compiler for inductor, an unsupported platform) is detected on a
trial forward pass and refused with one line.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .config import ConfigError

__all__ = [
    "autocast",
    "compile_module",
    "make_scaler",
    "resolve_precision",
    "to_channels_last",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, amp: bool, device: torch.device) -> str | None:
    """The autocast mode to use (``"bf16"``, ``"fp16"`` or None for fp32), or a one-line `ConfigError`.

    ``train.amp: true`` is the older spelling of fp16 on CUDA (ignored on other devices, as before).
    fp16 autocast on CPU has no loss scaler and underflows, so it is refused; bf16 works on CPU and CUDA.
    """
    if precision == "fp32":
        return "fp16" if amp and device.type == "cuda" else None
    if amp and precision != "fp16":
        raise ConfigError(f"train.amp: true means fp16 but train.precision is {precision!r}; drop train.amp")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs CUDA (device is {device.type}); use train.precision=bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: bf16 is not supported by this GPU; use fp16 or fp32")
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.precision: bf16 autocast is only used on cpu and cuda, not {device.type}; use fp32")
    return precision


def autocast(device: torch.device, mode: str | bool | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for `mode` (``"bf16"``/``"fp16"``; True = fp16 on CUDA; falsy = none)."""
    if mode is True:
        mode = "fp16" if device.type == "cuda" else None
    if not mode:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[str(mode)])


def make_scaler(mode: str | None, device: torch.device) -> Any:
    """A GradScaler for fp16 on CUDA (bf16 has fp32's exponent range and needs none), else None."""
    if mode == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store 4-d parameters and buffers channels-last (others are unaffected); re-run after growth."""
    return model.to(memory_format=torch.channels_last)


def batch_channels_last(x: Any) -> Any:
    """A 4-d input batch in channels-last layout; anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def compile_module(module: nn.Module, backend: str, example: torch.Tensor | None = None) -> nn.Module:
    """`torch.compile(module)`, checked with a trial forward on `example`; one-line `ConfigError` if unusable.

    Dynamo caches compiled code per module object, and growth swaps parameters and submodules, so the
    caller passes the grown module again after each growth and gets a freshly compiled wrapper.
    """
    if not hasattr(torch, "compile"):
        raise ConfigError(f"train.compile: torch {torch.__version__} has no torch.compile; set train.compile=false")
    try:
        from torch import _dynamo

        _dynamo.reset()  # drop graphs specialised on the pre-growth shapes
        compiled = torch.compile(module, backend=backend)
        if example is not None:
            was = module.training
            module.eval()
            try:
                with torch.no_grad():
                    compiled(example)
            finally:
                module.train(was)
    except Exception as e:  # noqa: BLE001 - any backend failure becomes one clear line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"train.compile: torch.compile (backend {backend!r}) is not available here "
            f"({type(e).__name__}: {msg}); set train.compile=false or another train.compile_backend"
        ) from None
    return compiled
