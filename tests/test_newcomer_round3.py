"""What a newcomer hits, round three: the growers by name at the package's top level, Firefly's refusal
naming each group's own reason (it blamed GroupNorm on a model without one), Firefly growing a residual
stream whose square layers both write and read it (it refused them), and `firefly export` taking `--out` as
`train` and `report` do."""

from __future__ import annotations

import warnings

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


class _GroupNormed(nn.Module):
    """Every hidden group under a GroupNorm: nothing Firefly has candidates for."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.a(x))).mean((2, 3)))


def test_firefly_refusal_names_each_groups_reason():
    torch.manual_seed(0)
    model = _GroupNormed()
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,)))] * 4
    with pytest.raises(GrowthError) as err:
        ff.make_grower("firefly").grow(model, data, F.cross_entropy)
    msg = str(err.value)
    assert "'a': a GroupNorm/grouped-conv constraint" in msg and "random and net2net can grow them" in msg
    assert "\n" not in msg
    report = ff.make_grower("random").grow(model, data, F.cross_entropy)  # and the hint is true
    assert report.params_after > report.params_before


class _SquareResidual(nn.Module):
    """Residual streams whose convs (or Linears) inside the loop map the stream to itself: one tensor both
    produces and consumes the group (Firefly refused such groups before)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.a, self.b, self.c, self.head = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        else:
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8) if kind == "conv-bn" else nn.Identity()
            self.c, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            z = torch.tanh(self.a(x))
            z = z + F.gelu(self.b(z))
            return self.head(F.relu(self.c(z)))
        z = F.relu(self.a(x))
        z = z + F.relu(self.bn(self.b(z)))
        z = z + torch.tanh(self.c(z))
        return self.head(z.mean((2, 3)))


def _square_case(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _SquareResidual(kind).double().eval()
    shape = (5,) if kind == "linear" else (3, 6, 6)
    return model, torch.randn(4, *shape, dtype=torch.float64), torch.randn(7, *shape, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["conv", "conv-bn", "linear"])
def test_firefly_candidates_on_a_square_layer_in_a_residual_loop_apply_as_scored(kind):
    """The engine perturbs producer slices only, so the candidates of a group one tensor both writes and reads
    are unambiguous: all off is f exactly, and a new unit and a split kept per group apply as the over-grown
    copy computed them."""
    from firefly_descent.budget import Candidate
    from firefly_descent.methods import Firefly
    from firefly_descent.methods.firefly.candidates import build_width_candidates

    model, x, fresh = _square_case(kind)
    graph = ff.analyze(model, x)
    groups = graph.growable()
    assert "a" in [g.name for g in groups]
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    cands = build_width_candidates(model, graph, groups, {g.name: 2 for g in groups}, True, (x,), init,
                                   torch.Generator().manual_seed(0))
    cands.bank.alpha = 0.0
    with torch.no_grad():
        assert (cands.net(fresh) - model(fresh)).abs().max().item() < 1e-12
    kept = []
    for g in groups:
        cands.bank.gates[f"new:{g.name}"][0] = 1.0
        cands.bank.gates[f"split:{g.name}"][1] = 1.0
        kept += [Candidate("new", g.name, 0, -1.0, 1.0), Candidate("split", g.name, 1, -1.0, 1.0)]
    with torch.no_grad():
        target = cands.net(fresh)
    assert (target - model(fresh)).abs().max().item() > 1e-2  # the candidates change the function
    ff.apply(model, Firefly()._materialize(graph, cands, None, kept, (x,)), example_inputs=(x,), verify=False)
    with torch.no_grad():
        assert (model(fresh) - target).abs().max().item() < 1e-10


def test_firefly_step_grows_the_residual_stream_of_square_layers():
    model, _, _ = _square_case("conv-bn")
    model = model.float().train()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(12)]
    before = model.b.weight.shape
    report = ff.make_grower("firefly", budget="units:3").grow(model, data, F.cross_entropy)
    assert report.outcome in ("accepted", "shrunk"), report.safety
    assert sum(report.units_added.values()) + sum(report.units_split.values()) == 3
    assert model.b.weight.shape == (before[0] + 3, before[1] + 3, 3, 3) and model.c.weight.shape[:2] == (11, 11)
    assert model(data[0][0]).shape == (16, 2)


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
    # an export holds a config.yaml but no checkpoints: resume must not train into it (it did: a run "killed before
    # its first checkpoint" restarted there), and inspect says what the folder is
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    for command in ("resume", "inspect"):
        assert main([command, str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip()
        assert "is an export (architecture.json, model.safetensors), not a run directory" in err and "\n" not in err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before


@pytest.mark.parametrize(
    ("loss_fn", "says"),
    [
        ("cross_entropy", "loss_fn must be a callable loss(outputs, targets)"),
        (lambda out: out.sum(), "TypeError"),
        (lambda out, y: F.cross_entropy(out, y, reduction="none"), "only one element tensors"),
        (lambda out, y: F.mse_loss(out, y.float()), "RuntimeError"),
    ],
)
@pytest.mark.parametrize("method", ["firefly", "random", "tiny"])
def test_a_loss_that_does_not_fit_is_one_line_before_anything_changes(loss_fn, says, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(16, 5), torch.randint(0, 3, (16,)))] * 4
    with pytest.raises(GrowthError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mse_loss's own broadcasting warning
        ff.make_grower(method).grow(model, data, loss_fn)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _digits_run(model: str, growth: dict) -> dict:
    """A two-epoch run of a registered model on the digits data."""
    return {
        "name": model,
        "data": {"name": "digits", "batch_size": 128},
        "model": {"name": model},
        "growth": growth,
        "train": {"epochs": 2, "seed": 0, "tensorboard": False},
    }


def test_a_config_whose_method_can_grow_nothing_is_refused_before_the_first_epoch(tmp_path):
    from firefly_descent.models import register_model
    from firefly_descent.train.config import ConfigError

    def groupnormed(in_channels: int = 1, num_classes: int = 2) -> nn.Module:
        model = _GroupNormed()
        model.a, model.head = nn.Conv2d(in_channels, 8, 3, padding=1), nn.Linear(8, num_classes)
        return model

    register_model("test-groupnormed", groupnormed)
    cfg = _digits_run("test-groupnormed", {"method": "firefly", "at": [1]})
    with pytest.raises(ConfigError, match=r"growth: no group Firefly can grow \('a': a GroupNorm"):
        train(cfg, tmp_path / "ff", progress=False)
    assert not (tmp_path / "ff").exists()
    named = {**cfg, "growth": {"method": "random", "kwargs": {"groups": ["nope"]}, "at": [1]}}
    with pytest.raises(ConfigError, match="no group named 'nope'"):
        train(named, tmp_path / "named", progress=False)


def test_models_and_datasets_commands_list_names_and_options(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vgg11" in out and "classifier='conv1x1'" in out and "'package.module:Class'" in out
    assert "in_channels=" not in out  # shape options come from the dataset, not listed as settings
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "arrays" in out and "imagefolder      train_dir='train'" in out and "mnist1d" in out


class _Gate(nn.Module):
    """Branches on values: no graph can be captured through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean() > 0 else x


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gate = nn.Conv2d(1, 6, 3, padding=1), _Gate()
        self.c2, self.bn, self.fc = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(F.relu(self.c1(x)))
        return self.fc(F.relu(self.bn(self.c2(h))).mean((2, 3)))


def test_exclude_makes_a_module_that_branches_on_values_opaque_as_the_error_advises():
    """The refusal says 'wrap that part in a module passed to exclude='; that module's code could not run on the
    analysis's meta tensors either, so exclusion failed too. An excluded module whose code cannot run on meta
    tensors now runs once as the real module on zeros (eval mode, no gradients) for its output's shape."""
    from firefly_descent.errors import DataDependentControlFlowError

    torch.manual_seed(0)
    model = _Gated().train()
    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(DataDependentControlFlowError, match="exclude="):
        ff.analyze(model, x)
    graph = ff.analyze(model, x, exclude=["gate"])
    assert [g.name for g in graph.growable()] == ["c2"] and "excluded" in graph["c1"].blocked[1]
    assert model.training and model.gate.training  # the real module ran in eval mode, then was put back
    data = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(8)]
    report = ff.make_grower("firefly", exclude=["gate"], budget="units:2").grow(model, data, F.cross_entropy)
    assert model.c2.out_channels == 7 and model.c1.out_channels == 6 and report.params_after > report.params_before
    before = model.eval()(x)
    ff.widen(model, x, {"c2": 2}, mode="split", exclude=["gate"])  # the library's shortcuts take it too
    assert model.c2.out_channels == 9 and (model(x) - before).abs().max().item() < 1e-5
    with pytest.raises(GrowthError, match="exclude must be a list of submodule names"):
        ff.make_grower("random", exclude="gate")


def test_a_config_names_the_modules_to_exclude(tmp_path):
    from firefly_descent.models import register_model
    from firefly_descent.train.config import ConfigError

    def gated(in_channels: int = 1, num_classes: int = 3) -> nn.Module:
        model = _Gated()
        model.fc = nn.Linear(5, num_classes)
        return model

    register_model("test-gated", gated)
    cfg = _digits_run("test-gated", {"method": "firefly", "kwargs": {"budget": "units:2"}, "at": [1]})
    with pytest.raises(ConfigError, match="wrap that part in a module named in growth.kwargs.exclude"):
        train(cfg, tmp_path / "a", progress=False)
    cfg["growth"]["kwargs"]["exclude"] = ["gat"]
    with pytest.raises(ConfigError, match=r"growth.kwargs.exclude: _Gated has no submodule 'gat' \(did you mean"):
        train(cfg, tmp_path / "typo", progress=False)
    cfg["growth"]["kwargs"]["exclude"] = ["gate"]
    assert train(cfg, tmp_path / "b", progress=False)["num_growths"] == 1
