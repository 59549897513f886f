"""Shared plumbing for growers: batches, losses, and filling in a GrowthReport around `apply`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..analysis import GrowthGraph
from ..analysis.trace import as_input_tuple as as_inputs
from ..budget import count_flops, count_params
from ..engine import apply
from ..errors import GrowthError
from ..plan import Plan
from .base import GrowthReport, LossFn, Timer


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def take_batches(data: Iterable[Any], n: int | None, device: torch.device) -> list[tuple[Any, Any]]:
    """The first `n` (inputs, targets) batches of `data` (all when n is None), moved to `device`."""
    if data is None:
        raise GrowthError("a grower needs data: pass an iterable of (inputs, targets) batches, e.g. a DataLoader")
    batches = []
    for batch in itertools.islice(iter(data), n):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise GrowthError("growth data must yield (inputs, targets) pairs")
        x, y = batch[0], batch[1]
        x = x.to(device) if isinstance(x, torch.Tensor) else tuple(t.to(device) for t in x)
        batches.append((x, y.to(device)))
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
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for x, y in batches:
                n = y.shape[0]
                total += float(loss_fn(model(*as_inputs(x)), y)) * n
                count += n
    finally:
        model.train(was)
    return total / max(1, count)


def start_report(method: str, model: nn.Module, graph: GrowthGraph, x: tuple[torch.Tensor, ...]) -> GrowthReport:
    return GrowthReport(
        method=method,
        widths_before={g.name: g.width for g in graph.growable()},
        params_before=count_params(model),
        flops_before=count_flops(model, x),
    )


def apply_and_report(
    model: nn.Module,
    plan: Plan,
    report: GrowthReport,
    x: tuple[torch.Tensor, ...],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Apply `plan` through the engine and record what it changed in `report`."""
    with Timer(report.timings, "apply"):
        if not plan.is_empty():
            apply(model, plan, optimizer, x)
    for c in plan.changes:
        if c.splits:
            report.units_split[c.group.name] = report.units_split.get(c.group.name, 0) + len(c.splits)
        if c.new is not None and c.new.count:
            report.units_added[c.group.name] = report.units_added.get(c.group.name, 0) + c.new.count
    report.layers_inserted += [layer.after for layer in plan.layers]
    report.widths_after = {
        name: w + report.units_split.get(name, 0) + report.units_added.get(name, 0)
        for name, w in report.widths_before.items()
    }
    report.params_after = count_params(model)
    report.flops_after = count_flops(model, x)
