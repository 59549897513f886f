"""What a newcomer hits, round three: the growers by name at the package's top level, Firefly's refusal
naming each group's own reason (it blamed GroupNorm on a model without one), and `firefly export` taking
`--out` as `train` and `report` do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.cli import main
from firefly_descent.errors import GrowthError
from firefly_descent.methods import make_grower
from firefly_descent.train import train


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


def test_export_takes_out_like_train_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = {
        "name": "round3",
        "data": {"name": "digits", "batch_size": 256},
        "model": {"name": "mlp", "kwargs": {"hidden": [4]}},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 1, "seed": 0, "tensorboard": False},
    }
    train(cfg, run, progress=False)
    assert main(["export", str(run), "--out", str(tmp_path / "a")]) == 0
    assert main(["export", str(run), str(tmp_path / "b")]) == 0
    a, b = ff.load_export(tmp_path / "a"), ff.load_export(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    capsys.readouterr()
    for args in ([], [str(tmp_path / "c"), "--out", str(tmp_path / "d")]):
        assert main(["export", str(run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "give the output folder once" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
