"""The control: no growth at all, but the same report as every other method."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..base import GrowthReport, LossFn, register_grower
from ._common import BaselineGrower


@register_grower("static")
class Static(BaselineGrower):
    """Leaves the model unchanged; reports its loss so runs of every method share one table."""

    name = "static"

    def grow(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: Any = None,
    ) -> GrowthReport:
        ctx = self.begin(model, data, loss_fn, example_inputs)
        return self.finish(ctx, self.make_plan(ctx, []), optimizer)
