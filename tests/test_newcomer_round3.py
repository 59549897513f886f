"""What a newcomer hits, round three: the growers by name at the package's top level, and Firefly's refusal
naming each group's own reason (it blamed GroupNorm on a model without one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.errors import GrowthError
from firefly_descent.methods import make_grower


def test_make_grower_is_at_the_top_level():
    assert ff.make_grower is make_grower and "make_grower" in ff.__all__ and "make_grower" in dir(ff)
    assert type(ff.make_grower("random")).__name__ == "RandomGrowth"


class _SquareResidual(nn.Module):
    """A residual stream whose only conv inside the loop maps the stream to itself (8 -> 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.a(x))
        z = z + F.relu(self.b(z))
        return self.head(z.mean((2, 3)))


def test_firefly_refusal_names_each_groups_reason():
    torch.manual_seed(0)
    model = _SquareResidual()
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))] * 4
    with pytest.raises(GrowthError) as err:
        ff.make_grower("firefly").grow(model, data, F.cross_entropy)
    msg = str(err.value)
    assert "GroupNorm" not in msg and "'a': a tensor both produces and consumes it" in msg
    assert "random and net2net can grow them" in msg and "\n" not in msg
    # and the hint is true: random growth grows that group
    report = ff.make_grower("random").grow(model, data, F.cross_entropy)
    assert report.outcome != "empty" and report.params_after > report.params_before
