"""Shared plumbing for growers: batches, losses, and committing a plan (checked) into a GrowthReport."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..analysis import GrowthGraph
from ..analysis.trace import as_input_tuple as as_inputs
from ..budget import count_params
from ..cost import flop_profile
from ..errors import GrowthError
from ..plan import Plan
from .base import Grower, GrowthReport, LossFn
from .safety import GrowthData, Safeguard, commit, heldout_loss


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def take_batches(data: Iterable[Any], n: int | None, device: torch.device) -> list[tuple[Any, Any]]:
    """The next `n` (inputs, targets) batches of `data` (all when n is None), moved to `device`.

    Pass a `GrowthData` to draw disjoint batches in turn (decision, then the safeguard's check)."""
    batches = GrowthData.of(data).draw(n, device)
    if not batches:
        raise GrowthError("growth data is empty")
    return batches


def example_from(batches: list[tuple[Any, Any]], example_inputs: Any, n: int = 4) -> tuple[torch.Tensor, ...]:
    """Example inputs for analysis and verification: the given ones, else a slice of the first batch."""
    if example_inputs is not None:
        return as_inputs(example_inputs)
    return tuple(t[:n] for t in as_inputs(batches[0][0]))


def mean_loss(model: nn.Module, batches: list[tuple[Any, Any]], loss_fn: LossFn) -> float:
    """Average loss over `batches` in eval mode (BatchNorm statistics frozen), no graph kept."""
    return heldout_loss(model, batches, loss_fn, train=False)


def start_report(method: str, model: nn.Module, graph: GrowthGraph, x: tuple[torch.Tensor, ...]) -> GrowthReport:
    """The report a step fills in. Its `flops_before` is the step's one count of the model (`flop_profile`,
    cached while the structure holds), which the step's costs and the training loop reuse."""
    return GrowthReport(
        method=method,
        widths_before={g.name: g.width for g in graph.growable()},
        params_before=count_params(model),
        flops_before=flop_profile(model, x).total,
    )


def commit_plan(
    grower: Grower,
    model: nn.Module,
    plan: Plan,
    report: GrowthReport,
    x: tuple[torch.Tensor, ...],
    optimizer: torch.optim.Optimizer | None,
    loss_fn: LossFn,
    data: GrowthData,
    decision_batches: list[tuple[Any, Any]],
    finalize: Callable[[], Any] | None = None,
    calibrate_new_bn: bool | None = None,
) -> None:
    """Apply `plan` through the engine under the grower's safeguard (check, shrink or undo, BatchNorm
    made ready to train) and record what it changed in `report`. `finalize` runs right after the plan
    is applied (e.g. loading trained weights); such a step is checked as one and never scaled."""
    guard = Safeguard.parse(grower.safeguard)
    if calibrate_new_bn is not None and calibrate_new_bn != guard.calibrate_new_bn:
        guard = dataclasses.replace(guard, calibrate_new_bn=calibrate_new_bn)
    # every grower settles BatchNorm on its decision batches before deciding (safety.settle_batchnorm)
    commit(model, plan, report, x, optimizer, loss_fn, data, decision_batches, guard, finalize, settled=True)
