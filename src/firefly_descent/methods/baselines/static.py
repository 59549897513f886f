"""The control: no growth at all, but the same report as every other method."""

from __future__ import annotations

from ..base import Decision, register_grower
from ._common import BaselineGrower, Context


@register_grower("static")
class Static(BaselineGrower):
    """Leaves the model unchanged; reports its loss so runs of every method share one table."""

    name = "static"

    def decide(self, ctx: Context) -> Decision:
        return Decision(self.make_plan(ctx, []), why_empty="the static control never grows")
