"""Baselines in the Firefly harness: each writes a plan the engine applies, under the same budgets.

Tolerances: function preservation max |Δ| ≤ 1e-5 (float32, fresh inputs, random BN statistics);
splitting matrix vs finite differences: relative 1e-5 (float64, central second difference with
h = 1e-3, truncation O(h²) ≈ 1e-6 relative); fast vs exact eigenvalue: relative 1e-6 (float64);
GradMax M vs a direct E[∂L/∂z xᵀ]: 1e-10 (float64).
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, randomize_norm_stats

from firefly_descent.analysis import analyze
from firefly_descent.budget import Budget
from firefly_descent.engine import apply
from firefly_descent.errors import GrowthError
from firefly_descent.methods import available_growers, make_grower
from firefly_descent.methods.base import mean_loss
from firefly_descent.methods.baselines import (
    NASH,
    GradMax,
    Net2Net,
    RandomGrowth,
    SplittingExact,
    SplittingFast,
    Static,
)
from firefly_descent.plan import GroupChange, Plan, Split

NAMES = ["static", "net2net", "random", "nash", "splitting-exact", "splitting-fast", "gradmax"]
PRESERVING = {  # kwargs under which a method promises an unchanged function
    "static": {},
    "net2net": {"noise": 0.0},
    "random": {"out_scale": 0.0},
    "splitting-exact": {"eps": 0.0},
    "splitting-fast": {"eps": 0.0},
    "gradmax": {"incoming_std": 0.0},
}
MODELS = ["mlp", "vgg_flatten", "resnet_basic", "mobilenetv1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster single-threaded (thread start-up dominates); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


pytestmark = pytest.mark.usefixtures("raw_plans")  # plans as the method decided them (tests/conftest.py)


def _data(model, x, n=2, bs=6, seed=1, dtype=torch.float32):
    """Random classification batches shaped like the model's example input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classes = copy.deepcopy(model).eval()(*x).shape[1]  # a copy: train-mode BN would update statistics
    return [(torch.randn((bs, *x[0].shape[1:]), generator=g, dtype=dtype),
             torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def _kwargs(name):
    if name == "nash":
        return {"children": 2, "child_steps": 2, "seed": 3}
    return dict(PRESERVING[name])


def test_registered():
    assert set(NAMES) <= set(available_growers())
    for name, cls in zip(NAMES, [Static, Net2Net, RandomGrowth, NASH, SplittingExact, SplittingFast, GradMax]):
        assert isinstance(make_grower(name), cls)
    assert NASH.needs_validation is True


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", NAMES)
def test_grows_zoo_model_and_trains(method, model_name):
    model, x = ZOO[model_name]()
    randomize_norm_stats(model, seed=2)
    data = _data(model, x)
    graph = analyze(model, x)
    limit = Budget.parse(0.35).limit(graph.growable())
    reference = copy.deepcopy(model).eval()
    before = {n: p.shape for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    grower = make_grower(method, budget=0.35, **_kwargs(method))
    report = grower.grow(model, data, F.cross_entropy, optimizer=opt, example_inputs=x)

    grown = sum(report.units_split.values()) + sum(report.units_added.values())
    assert grown <= limit
    if method != "static":
        assert grown + len(report.layers_inserted) > 0
    assert report.loss_before is not None and report.loss_after is not None
    assert report.timings and report.params_after >= report.params_before
    if method in PRESERVING:
        fresh = torch.randn_like(x[0])
        model.eval()
        with torch.no_grad():
            assert (model(fresh) - reference(fresh)).abs().max().item() <= 1e-5
        assert report.loss_after == pytest.approx(report.loss_before, abs=1e-5)

    # the grown model trains: finite loss, every grown parameter receives a finite gradient
    model.train()
    opt.zero_grad()
    loss = F.cross_entropy(model(data[0][0]), data[0][1])
    assert torch.isfinite(loss)
    loss.backward()
    changed = [p for n, p in model.named_parameters() if before.get(n) != p.shape]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    if method != "static":
        assert changed and sum(float(p.grad.abs().sum()) for p in changed) > 0
    opt.step()


@pytest.mark.parametrize("method", ["net2net", "random", "nash", "splitting-fast"])
def test_deterministic_for_a_seed(method):
    kw = {"noise": 0.1} if method == "net2net" else {"out_scale": 0.01} if method == "random" else {}
    if method == "nash":
        kw = {"children": 2, "child_steps": 2}
    states = []
    for _ in range(2):
        model, x = ZOO["vgg_flatten"]()
        make_grower(method, seed=7, **kw).grow(model, _data(model, x), F.cross_entropy, example_inputs=x)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_net2net_noise_and_deepening():
    model, x = ZOO["mlp"]()
    data = _data(model, x)
    ref = copy.deepcopy(model)
    Net2Net(noise=0.1, seed=1).grow(model, data, F.cross_entropy, example_inputs=x)
    with torch.no_grad():
        drift = (model(x[0]) - ref(x[0])).abs().max().item()
    assert 0 < drift < 0.5  # symmetry broken, function close
    for name, after in [("mlp", ["net.1"]), ("vgg_flatten", ["features.5"]), ("resnet_basic", None)]:
        model, x = ZOO[name]()
        randomize_norm_stats(model)
        ref = copy.deepcopy(model).eval()
        report = Net2Net(widen=False, deepen=True, deepen_after=after, seed=0).grow(
            model, _data(model, x), F.cross_entropy, example_inputs=x)
        assert len(report.layers_inserted) == 1
        model.eval()
        fresh = torch.randn_like(x[0])
        with torch.no_grad():
            assert (model(fresh) - ref(fresh)).abs().max().item() <= 1e-5
    # after a ReLU the layer is Net2Net's identity Linear + ReLU
    model, x = ZOO["mlp"]()
    Net2Net(widen=False, deepen_after=["net.3"]).grow(model, _data(model, x), F.cross_entropy, example_inputs=x)
    inserted = model.net[3][1]
    assert isinstance(inserted[0], nn.Linear) and torch.equal(inserted[0].weight, torch.eye(7))


# ---- splitting ----------------------------------------------------------------------------------
def _tiny(kind, act):
    """(model, inputs, split layer): a float64 net whose group "0" has a split-able unit layer."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), act, nn.Linear(4, 2))
        x, layer = torch.randn(5, 3), "0"
    elif kind == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), act, nn.Flatten(1),
                              nn.Linear(3 * 4 * 4, 2))
        x, layer = torch.randn(5, 2, 4, 4), "0"
    else:  # depthwise: the unit is the depthwise neuron "3" (its 3x3 filter + bias over its own channel)
        model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
                              nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3), act,
                              nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        x, layer = torch.randn(5, 2, 4, 4), "3"
    randomize_norm_stats(model, seed=4)
    model = model.double()
    return model, (x.double(),), layer


def _split_loss(model, x, data, layer, unit, v, eps):
    """Mean loss after splitting `unit` of group "0" into θ ± eps·v (θ: `layer`'s filter and bias,
    outgoing weights halved) through the engine."""
    m = copy.deepcopy(model)
    w = m.get_submodule(layer).weight
    n = w[0].numel()
    dirs = {f"{layer}.weight": v[:n].reshape(1, *w.shape[1:]), f"{layer}.bias": v[n:n + 1]}
    group = analyze(m, x)["0"]
    plan = Plan([GroupChange(group, splits=[Split(unit, dirs, eps=eps)])], function_preserving=False)
    apply(m, plan, None, x)
    return mean_loss(m, data, F.cross_entropy)


@pytest.mark.parametrize("kind", ["mlp", "conv", "depthwise"])
def test_splitting_matrix_matches_finite_difference(kind):
    """d²L/dε² at 0 of L(θ+εv, θ−εv, outgoing halved) equals vᵀ S v (derivation in splitting.py)."""
    model, x, layer = _tiny(kind, nn.Softplus(beta=2.0))
    data = _data(model, x, n=2, bs=7, dtype=torch.float64)
    S = SplittingExact().matrices(model, data, F.cross_entropy, example_inputs=x)["0"]
    D = S.shape[-1]
    assert D == model.get_submodule(layer).weight[0].numel() + 1
    g = torch.Generator().manual_seed(5)
    h = 1e-3
    l0 = mean_loss(model, data, F.cross_entropy)
    for unit in (0, 2):
        for v in (torch.randn(D, generator=g, dtype=torch.float64), torch.linalg.eigh(S[unit])[1][:, 0]):
            plus = _split_loss(model, x, data, layer, unit, v, h)
            minus = _split_loss(model, x, data, layer, unit, v, -h)
            fd = (plus - 2 * l0 + minus) / h**2
            assert fd == pytest.approx(float(v @ S[unit] @ v), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "conv", "depthwise"])
def test_splitting_fast_matches_exact(kind):
    model, x, _ = _tiny(kind, nn.ReLU())
    data = _data(model, x, n=2, bs=7, dtype=torch.float64)
    exact = SplittingExact().analyse(model, data, F.cross_entropy, example_inputs=x)["0"]
    fast = SplittingFast(iters=60, tol=1e-12).analyse(model, data, F.cross_entropy, example_inputs=x)["0"]
    assert torch.allclose(fast[0], exact[0], rtol=1e-6, atol=1e-12)
    cos = (fast[1] * exact[1]).sum(1).abs()
    assert (cos > 1 - 1e-4).all()
    # chunking under a small memory limit changes nothing; a limit below one D×D matrix refuses
    D = exact[1].shape[1]
    chunked = SplittingExact(memory_limit=2 * D * D * 16).analyse(model, data, F.cross_entropy, example_inputs=x)
    assert torch.allclose(chunked["0"][0], exact[0], rtol=1e-10)
    with pytest.raises(GrowthError, match=rf"group '0'.*D={D}"):
        SplittingExact(memory_limit=D * D * 16 - 1).analyse(model, data, F.cross_entropy, example_inputs=x)
    # fast without caching (each product re-reads the batches) agrees too
    streamed = SplittingFast(iters=60, tol=1e-12, memory_limit=D * D * 8 * 4).analyse(
        model, data, F.cross_entropy, example_inputs=x)
    assert torch.allclose(streamed["0"][0], exact[0], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("cls", [SplittingExact, SplittingFast])
def test_splitting_predicted_change_matches_measured(cls):
    """End to end on a smooth net: the applied splits lower the loss by Σ ½ε²λ_i (+ O(ε⁴))."""
    model, x, _ = _tiny("conv", nn.Softplus(beta=2.0))
    data = _data(model, x, n=2, bs=7, dtype=torch.float64)
    report = cls(budget="units:2", eps=1e-2, relative_eps=False).grow(
        model, data, F.cross_entropy, example_inputs=x)
    assert sum(report.units_split.values()) == 2
    assert report.predicted_loss_change < 0
    assert report.measured_loss_change == pytest.approx(report.predicted_loss_change, rel=1e-3)


def test_splitting_picks_most_negative_and_refuses_named_unfit_group():
    model, x = ZOO["mlp"]()
    data = _data(model, x)
    grower = SplittingExact(budget="units:3")
    eigs = grower.analyse(copy.deepcopy(model), data, F.cross_entropy, example_inputs=x)
    report = grower.grow(model, data, F.cross_entropy, example_inputs=x)
    ranked = sorted((float(v), n, i) for n, (vals, _) in eigs.items() for i, v in enumerate(vals) if v < 0)[:3]
    chosen = sorted((n, s.unit) for c in grower.last_plan.changes for n in [c.group.name] for s in c.splits)
    assert chosen == sorted((n, i) for _, n, i in ranked)
    assert report.predicted_loss_change < 0
    resnet, rx = ZOO["resnet_basic"]()
    for cls in (SplittingExact, GradMax):  # residual-tied producers: refused when named, skipped otherwise
        with pytest.raises(GrowthError, match="stem.0.*producers"):
            cls(groups=["stem.0"]).grow(resnet, _data(resnet, rx), F.cross_entropy, example_inputs=rx)


def test_energy_aware_ranks_by_eigenvalue_per_flop():
    model, x = ZOO["vgg_flatten"]()
    data = _data(model, x)
    eigs = SplittingFast().analyse(copy.deepcopy(model), data, F.cross_entropy, example_inputs=x)
    grower = SplittingFast(budget="units:3", energy_aware=True)
    report = grower.grow(model, data, F.cross_entropy, example_inputs=x)
    energy = report.extra["energy"]
    assert len(set(energy.values())) > 1  # groups differ in FLOPs per unit
    ranked = sorted((float(v) / energy[n], n, i) for n, (vals, _) in eigs.items()
                    for i, v in enumerate(vals) if v < 0)[:3]
    chosen = sorted((c.group.name, s.unit) for c in grower.last_plan.changes for s in c.splits)
    assert chosen == sorted((n, i) for _, n, i in ranked)


# ---- GradMax ------------------------------------------------------------------------------------
def _direct_m(model, data, producer, consumer, conv):
    """E[∂L/∂z_{l+1} x_lᵀ] computed directly (conv: over positions, 1×1 consumer, unfold of x_l)."""
    total = 0
    for xb, yb in data:
        cap: dict[str, torch.Tensor] = {}
        h1 = producer.register_forward_hook(lambda m, i, o, cap=cap: cap.__setitem__("x", i[0]))
        h2 = consumer.register_forward_hook(lambda m, i, o, cap=cap: cap.__setitem__("z", o))
        loss = F.cross_entropy(model(xb), yb)
        h1.remove(), h2.remove()
        (gz,) = torch.autograd.grad(loss, cap["z"])
        if conv:
            X = F.unfold(cap["x"], producer.kernel_size, padding=producer.padding).transpose(1, 2).reshape(
                -1, producer.weight[0].numel())
            gz = gz.movedim(1, -1).reshape(-1, gz.shape[1])
        else:
            X = cap["x"]
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
        total = total + gz.T @ X
    return total / len(data)


@pytest.mark.parametrize("conv", [False, True])
def test_gradmax_outgoing_is_top_singular_vectors(conv):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)).double()
        x = (torch.randn(4, 2, 4, 4, dtype=torch.float64),)
    else:
        model, x = ZOO["mlp"]()
        model = model.double()
        x = (x[0].double(),)
    data = _data(model, x, dtype=torch.float64)
    producer, consumer = (model[0], model[2]) if conv else (model.net[0], model.net[2])
    direct = _direct_m(model, data, producer, consumer, conv)
    group = "0" if conv else "net.0"
    M = GradMax(batches=None).matrices(model, data, F.cross_entropy, example_inputs=x)[group]
    assert torch.allclose(M, direct, atol=1e-10)
    U, S, _ = torch.linalg.svd(direct)
    grower = GradMax(budget="units:2", groups=[group], batches=None, incoming_std=0.0)
    ref = copy.deepcopy(model)
    report = grower.grow(model, data, F.cross_entropy, example_inputs=x)
    new = grower.last_plan.changes[0].new
    assert new.count == 2 and not new.incoming  # zero incoming weights (the engine's default fill)
    out = new.outgoing["2.weight" if conv else "net.2.weight"].reshape(2, -1)
    c = report.extra["out_norm"][group]
    assert torch.allclose(out.norm(dim=1), torch.full((2,), c, dtype=out.dtype))
    cos = (out / c * U[:, :2].T).sum(1).abs()
    assert (cos > 1 - 1e-8).all()
    assert report.extra["singular_values"][group][:2] == pytest.approx(S[:2].tolist(), rel=1e-8)
    with torch.no_grad():
        assert (model(x[0]) - ref(x[0])).abs().max() <= 1e-12


# ---- NASH ---------------------------------------------------------------------------------------
class Loader:
    """An iterable of batches that counts how often it is iterated (or refuses to be)."""

    def __init__(self, batches, forbidden=False):
        self.batches, self.forbidden, self.iterations = batches, forbidden, 0

    def __iter__(self):
        if self.forbidden:
            raise AssertionError("the test set was read")
        self.iterations += 1
        return iter(self.batches)


def test_nash_selects_on_validation_never_on_test():
    assert "test" not in " ".join(inspect.signature(NASH.grow).parameters)
    model, x = ZOO["vgg_flatten"]()
    train = Loader(_data(model, x, seed=1))
    val = Loader(_data(model, x, seed=2))
    test = Loader(_data(model, x, seed=3), forbidden=True)
    grower = make_grower("nash", children=3, child_steps=3, seed=0)
    assert grower.needs_validation
    grower.val_data = val  # what the training loop does; nothing else reaches the grower
    report = grower.grow(model, train, F.cross_entropy, example_inputs=x)
    assert train.iterations >= 1 and val.iterations >= 1 and test.iterations == 0
    losses = report.extra["val_losses"]
    assert len(losses) == 3 and report.extra["winner"] == min(range(3), key=losses.__getitem__)
    assert report.extra["search_time"] > 0 and report.extra["validation"] == "val_data"
    # the winner's weights were copied in: the model's validation loss is the winner's
    assert mean_loss(model, val.batches, F.cross_entropy) == pytest.approx(report.extra["winner_val_loss"], rel=1e-6)

    # without val_data NASH carves a seeded validation split from its own growth batches
    model, x = ZOO["mlp"]()
    train = Loader(_data(model, x, seed=1))
    report = make_grower("nash", children=2, child_steps=2).grow(model, train, F.cross_entropy, example_inputs=x)
    assert train.iterations >= 1 and report.extra["validation"].startswith("carved")


def test_gradmax_units_train_behind_relu():
    """Exactly zero incoming weights never train behind a ReLU (PyTorch's ReLU'(0) = 0); the default tiny
    incoming noise lets the new units learn."""
    torch.manual_seed(0)
    model, x = ZOO["mlp"]()
    data = [(torch.randn(16, *x[0].shape[1:]), torch.randint(0, 3, (16,))) for _ in range(2)]
    grown = {}
    for std in (0.0, 1e-3):
        m = copy.deepcopy(model)
        GradMax(budget="units:2", incoming_std=std, groups=["net.0"]).grow(m, data, F.cross_entropy)
        w = m.net[0].weight
        F.cross_entropy(m(data[0][0]), data[0][1]).backward()
        grown[std] = w.grad[-2:].abs().sum().item()
    assert grown[0.0] == 0.0 and grown[1e-3] > 0


def test_random_matched_placement_follows_a_run_log(tmp_path):
    model, x = ZOO["mlp"]()
    names = [g.name for g in analyze(model, x).growable()]
    log = tmp_path / "growth.jsonl"
    log.write_text(
        json.dumps({"units_split": {names[0]: 2}, "units_added": {names[0]: 1, names[-1]: 2}}) + "\n"
        + json.dumps({"units_added": {names[-1]: 1}}) + "\n"
    )
    grower = make_grower("random", placement=str(tmp_path), seed=0)
    r1 = grower.grow(model, _data(model, x), F.cross_entropy, example_inputs=x)
    assert r1.units_added == {names[0]: 3, names[-1]: 2}
    r2 = grower.grow(model, _data(model, x), F.cross_entropy, example_inputs=x)
    assert r2.units_added == {names[-1]: 1}
    with pytest.raises(GrowthError, match="placement has 2 growth step"):
        grower.grow(model, _data(model, x), F.cross_entropy, example_inputs=x)
    assert make_grower("random", placement=[{names[0]: 1}]).grow(
        copy.deepcopy(model), _data(model, x), F.cross_entropy, example_inputs=x
    ).units_added == {names[0]: 1}
