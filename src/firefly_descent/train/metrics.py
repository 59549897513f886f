"""What a run measures: the loss, held-out loss and accuracy, model size and FLOPs, the final summary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..budget import count_flops, count_params
from .device import to_device
from .precision import autocast

__all__ = ["evaluate", "flops_per_example", "make_loss", "param_count", "summarize"]


def _fit_target(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.shape != y.shape and out.numel() == y.numel():
        return y.reshape(out.shape)
    return y


class _RegressionLoss(nn.Module):
    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out, _fit_target(out, y).to(out.dtype))


def make_loss(task: str, label_smoothing: float) -> nn.Module:
    """Mean squared error for ``regression`` (targets reshaped to the output), else cross-entropy."""
    if task == "regression":
        return _RegressionLoss()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    task: str = "classification",
    amp: bool | str | None = False,
) -> dict[str, float | None]:
    """Mean loss and accuracy (None for regression) of `model` over `loader`, in eval mode.

    `amp`: a precision mode (``"bf16"``/``"fp16"``, train/precision.py) or the older bool (fp16 on CUDA)."""
    was_training = model.training
    model.eval()
    loss_fn = make_loss(task, 0.0)
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in loader:
            x, y = to_device(x, device), to_device(y, device)
            with autocast(device, amp):
                out = model(x)
            out = out.float()
            n = int(y.shape[0])
            loss_sum += float(loss_fn(out, y)) * n
            if task == "classification":
                correct += int((out.argmax(dim=1) == y).sum())
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        return {"loss": None, "acc": None}
    return {"loss": loss_sum / total, "acc": (correct / total) if task == "classification" else None}


def param_count(model: nn.Module) -> int:
    """The model's parameter count, as the budgets count it."""
    return int(count_params(model))


def flops_per_example(model: nn.Module, example: torch.Tensor) -> int | None:
    """FLOPs of one forward pass on a single example in eval mode (None if they cannot be counted)."""
    was_training = model.training
    model.eval()
    try:
        return int(count_flops(model, (example[:1],)))
    except Exception:  # FLOPs are informative only; never fail a run over them
        return None
    finally:
        model.train(was_training)


def summarize(metrics: list[dict[str, Any]], growths: list[dict[str, Any]]) -> dict[str, Any]:
    """Final metrics of a run from its per-epoch rows and growth records."""
    if not metrics:
        return {"epochs": 0, "num_growths": len(growths)}
    last = metrics[-1]
    accs = [r["test_acc"] for r in metrics if r.get("test_acc") is not None]
    out = {
        "epochs": last["epoch"],
        "final_test_loss": last.get("test_loss"),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max(accs) if accs else None,
        "final_train_loss": last.get("train_loss"),
        "final_train_acc": last.get("train_acc"),
        "params": last.get("params"),
        "flops": last.get("flops"),
        "num_growths": len(growths),
        "total_time": last.get("elapsed"),
        "growth_time": float(sum(r.get("time", 0.0) for r in growths)),
    }
    if "val_acc" in last:
        out["final_val_acc"] = last.get("val_acc")
    return out
