"""TINY (methods/baselines/tiny.py): closed form, projection, value over random directions, engine, peer.

Tolerances (float64 unless said): first-order decrease vs the finite difference of the engine-grown model's
loss at γ = 1e-3 with a tanh net: relative 1e-4 (the remainder is O(γ²) ≈ 1e-6 relative, rounding ≈ 1e-10);
orthogonality of the projection: ‖E[A V_projᵀ]‖ ≤ 1e-10 ‖E[A Vᵀ]‖; the closed form vs an independent
least-squares solve: 1e-8 relative; function preservation at γ = 0: 1e-6 (float32); hooks vs engine
loss at the chosen γ: 1e-10 (float64); vs GroMo 0.1.0: λ and first-order values 1e-9 relative, principal
angles of the added weights' spans ≤ 1e-6 rad (arccos resolves ~3e-8 near 1).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from firefly_descent.methods import make_grower
from firefly_descent.methods.base import mean_loss
from firefly_descent.methods.baselines import TINY


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(act=nn.Tanh, dtype=torch.float64, sizes=(5, 6, 4, 3), seed=0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def _cnn(act=nn.ReLU, dtype=torch.float32, pool=False, seed=0):
    """conv-BN-act-conv(stride 2)-act-flatten-linear (both groups TINY-growable), or with a max-pool before
    the flatten (the second group is then skipped)."""
    torch.manual_seed(seed)
    c2 = nn.Conv2d(4, 5, 3, padding=1, stride=1 if pool else 2)
    body = [nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), act(), c2, act()]
    body += [nn.MaxPool2d(2)] if pool else []
    model = nn.Sequential(*body, nn.Flatten(1), nn.Linear(5 * 4 * 4, 3)).to(dtype)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    return model


pytestmark = pytest.mark.usefixtures("raw_plans")  # plans as the method decided them (tests/conftest.py)


def _data(shape, classes=3, n=2, bs=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((bs, *shape), generator=g, dtype=dtype), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def _solve(model, data, **kw):
    grower = TINY(batches=None, **kw)
    ctx = grower.begin(model, data, F.cross_entropy, None)
    return grower, ctx, grower.analyse(ctx, grower.paths(ctx))


def test_registered():
    assert isinstance(make_grower("tiny"), TINY)
    assert make_grower("tiny").update_existing is True  # GroMo's default


# ---- the closed form --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("update_existing", [False, True])
def test_first_order_decrease_matches_finite_difference(model_kind, update_existing):
    """The predicted decrease per unit of γ² (new neuron, plus δW* when updating) is the derivative of the
    engine-grown model's loss: tanh has σ(γu) = γu + O(γ³), so loss(γ) = loss(0) - γ²·fo + O(γ⁴)."""
    if model_kind == "mlp":
        model, data = _mlp(), _data((5,))
    else:
        model, data = _cnn(act=nn.Tanh, dtype=torch.float64), _data((2, 8, 8), bs=48)  # > 81 flatten inputs
    _, _, sol = _solve(model, data)
    assert set(sol) == ({"0", "2"} if model_kind == "mlp" else {"0", "3"})
    gamma = 1e-3
    for group, tg in sol.items():
        k = int(torch.argmax(tg.improvement))  # the neuron a one-unit budget picks
        fo = float(tg.first_order[k]) + (tg.delta_decrease if update_existing else 0.0)
        grown = copy.deepcopy(model)
        grower = TINY(budget="units:1", groups=[group], batches=None, gamma=gamma, update_existing=update_existing)
        report = grower.grow(grown, data, F.cross_entropy)
        assert report.units_added == {group: 1}
        measured = (mean_loss(grown, data, F.cross_entropy) - mean_loss(model, data, F.cross_entropy)) / gamma**2
        assert measured == pytest.approx(-fo, rel=1e-4), group
        assert report.predicted_loss_change == pytest.approx(-gamma**2 * fo, rel=1e-12)
        assert abs(fo) > 1e-6  # a real signal, not two zeros agreeing


def _independent_stats(model, data, producer, consumer):
    """B (producer input + 1), A (consumer input + 1), V = -∂(summed loss)/∂z, with the test's own hooks."""
    Bs, As, Vs = [], [], []
    for x, y in data:
        cap = {}
        h1 = producer.register_forward_hook(lambda m, i, o, cap=cap: cap.__setitem__("b", i[0]))
        h2 = consumer.register_forward_hook(
            lambda m, i, o, cap=cap: cap.__setitem__("a", i[0]) or cap.__setitem__("z", o))
        loss = F.cross_entropy(model(x), y, reduction="sum")
        h1.remove(), h2.remove()
        (gz,) = torch.autograd.grad(loss, cap["z"])
        one = torch.ones(x.shape[0], 1, dtype=x.dtype)
        Bs.append(torch.cat([cap["b"].detach(), one], 1))
        As.append(torch.cat([cap["a"].detach(), one], 1))
        Vs.append(-gz)
    return torch.cat(Bs), torch.cat(As), torch.cat(Vs)


def test_projection_is_orthogonal_and_closed_form_is_least_squares():
    model, data = _mlp(act=nn.ReLU, sizes=(5, 7, 6, 3)), _data((5,), n=3, bs=20)
    _, _, sol = _solve(model, data)
    for group, (prod, cons) in {"0": (model[0], model[2]), "2": (model[2], model[4])}.items():
        tg = sol[group]
        B, A, V = _independent_stats(model, data, prod, cons)
        n = B.shape[0]
        assert torch.allclose(tg.delta.T, torch.linalg.lstsq(A, V).solution, rtol=1e-8, atol=1e-10)
        Vp = V - A @ tg.delta.T
        assert (A.T @ Vp).norm() <= 1e-10 * (A.T @ V).norm()  # the bottleneck is uncorrelated with A
        assert tg.residual_corr <= 1e-10
        assert tg.delta_decrease == pytest.approx(float((A @ tg.delta.T * V).sum()) / n, rel=1e-10)
        # all neurons together = the unconstrained least-squares fit of V_proj by a map of the producer input
        theta = tg.alpha.T @ tg.omega  # [D_in, D_out]
        ls = torch.linalg.lstsq(B, Vp).solution
        assert torch.allclose(theta, ls, rtol=1e-8, atol=1e-10 * float(ls.abs().max()))
        # neuron k removes λ_k² of the bottleneck ‖V_proj‖²/n (ranking quantity), in decreasing order
        assert tg.lambdas[0] > 0 and bool((tg.lambdas[:-1] >= tg.lambdas[1:]).all())
        one = (B @ tg.alpha[:1].T) @ tg.omega[:1]
        assert (Vp.pow(2).sum() - (Vp - one).pow(2).sum()) / n == pytest.approx(float(tg.lambdas[0] ** 2), rel=1e-8)


def test_conv_projection_orthogonal_and_hooks_match_engine():
    """k×k and flatten consumers: the projection stays orthogonal, and the line search's hook-computed loss at
    the chosen γ is exactly the loss of the model the engine builds."""
    model, data = _cnn(dtype=torch.float64), _data((2, 8, 8), bs=48)
    for group in ("0", "3"):
        grown = copy.deepcopy(model)
        grower = TINY(budget="units:2", groups=[group], batches=None)
        report = grower.grow(grown, data, F.cross_entropy)
        tg = grower.last_solution[group]
        assert tg.residual_corr <= 1e-10
        assert report.extra["gamma"][group] > 0 and report.units_added == {group: 2}
        assert report.loss_after == pytest.approx(report.extra["line_loss"][group], abs=1e-10)
        assert report.loss_after < report.loss_before - 1e-3
    # both groups at once: γs searched group after group with the earlier ones on; the last search's loss
    # is the grown model's loss
    grown = copy.deepcopy(model)
    budget = {"kind": "units", "amount": 9, "per_group": True}  # pools by width: 4 and 5 units
    report = TINY(budget=budget, batches=None, update_existing=False).grow(grown, data, F.cross_entropy)
    assert set(report.extra["gamma"]) == {"0", "3"} and set(report.units_added) == {"0", "3"}
    last = list(report.extra["gamma"])[-1]
    assert report.loss_after == pytest.approx(report.extra["line_loss"][last], abs=1e-10)
    assert report.predicted_loss_change == pytest.approx(report.loss_after - report.loss_before, abs=1e-10)
    # the same with the existing-weight updates (default), on an MLP whose groups chain (net 2 is the consumer
    # of one group and the producer of the other)
    model, data = _mlp(act=nn.ReLU, sizes=(5, 7, 6, 3)), _data((5,), n=3, bs=20)
    report = TINY(budget={"kind": "units", "amount": 4, "per_group": True}, batches=None).grow(
        model, data, F.cross_entropy)
    last = list(report.extra["gamma"])[-1]
    assert len(report.extra["gamma"]) == 2, report.extra["gamma"]
    assert report.loss_after == pytest.approx(report.extra["line_loss"][last], abs=1e-10)


def test_update_existing_line_search_matches_engine():
    """With GroMo's option the existing consumer weights move by γ²·δW* too: the searched loss is the loss of
    the grown model, and it is at least as low as without the update on this MLP."""
    model, data = _mlp(act=nn.ReLU, sizes=(5, 7, 6, 3)), _data((5,), n=3, bs=20)
    after = {}
    for upd in (False, True):
        grown = copy.deepcopy(model)
        report = TINY(budget="units:2", groups=["0"], batches=None, update_existing=upd).grow(
            grown, data, F.cross_entropy)
        assert report.loss_after == pytest.approx(report.extra["line_loss"]["0"], abs=1e-10)
        changed = not torch.equal(grown[2].weight[:, :7], model[2].weight)
        assert changed == upd  # old columns of the consumer move only with update_existing
        after[upd] = report.loss_after
    assert after[True] < after[False]


def test_holdout_batches_choose_gamma_only():
    model, data = _mlp(act=nn.ReLU, sizes=(5, 7, 6, 3)), _data((5,), n=4, bs=20)
    grower = TINY(budget="units:2", groups=["0"], batches=None, holdout=1)
    ctx = grower.begin(copy.deepcopy(model), data, F.cross_entropy, None)
    stats, line = grower._split(ctx)
    assert len(stats) == 3 and line[0] is ctx.batches[3]
    _, _, sol = _solve(model, data[:3])  # the statistics ignore the held-out batch
    grown = copy.deepcopy(model)
    report = grower.grow(grown, data, F.cross_entropy)
    assert torch.allclose(grower.last_solution["0"].lambdas, sol["0"].lambdas, rtol=1e-12)
    held = mean_loss(grown, data[3:], F.cross_entropy)
    assert report.extra["line_loss"]["0"] == pytest.approx(held, abs=1e-10)
    assert report.predicted_loss_change == pytest.approx(held - mean_loss(model, data[3:], F.cross_entropy),
                                                         abs=1e-10)
    from firefly_descent.errors import GrowthError

    with pytest.raises(GrowthError, match="holdout"):
        TINY(holdout=2, batches=None).grow(copy.deepcopy(model), data[:2], F.cross_entropy)


# ---- value -------------------------------------------------------------------------------------------
def test_teacher_student_tiny_beats_random_directions():
    """A wide teacher, a narrow student trained to a plateau: one TINY step lowers the held-out loss more
    than the same number of random new neurons with the same norms and the same line search."""
    torch.manual_seed(0)
    teacher = _mlp(act=nn.Tanh, sizes=(4, 16, 2), seed=10)
    with torch.no_grad():
        teacher[2].weight.mul_(3)  # a clearly non-linear target
    student = _mlp(act=nn.Tanh, sizes=(4, 2, 2), seed=11)
    g = torch.Generator().manual_seed(3)
    xs, xh = torch.randn(256, 4, generator=g, dtype=torch.float64), torch.randn(1024, 4, generator=g,
                                                                                 dtype=torch.float64)
    with torch.no_grad():
        ys, yh = teacher(xs), teacher(xh)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(student(xs), ys).backward()
        opt.step()
    train = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, 256, 64)]
    held = [(xh, yh)]
    base = mean_loss(student, held, F.mse_loss)
    drops = {}
    for name, kw in {"tiny": {}, "random": {"random_directions": True}}.items():
        d = []
        for seed in range(3):
            m = copy.deepcopy(student)
            TINY(budget="units:3", groups=["0"], batches=None, seed=seed, update_existing=False, **kw).grow(
                m, train, F.mse_loss)
            d.append(base - mean_loss(m, held, F.mse_loss))
        drops[name] = d
    # measured: tiny 3.4e-4 (deterministic), random 4.2e-5, 0, -1.6e-5 (held-out loss 0.0213 before)
    assert min(drops["tiny"]) > 0
    assert min(drops["tiny"]) > max(drops["random"]), drops
    assert sum(drops["tiny"]) > 3 * sum(drops["random"]), drops


# ---- through the engine ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_kind", ["mlp", "cnn", "cnn_pool"])
def test_engine_preserves_at_zero_changes_and_trains(model_kind):
    if model_kind == "mlp":
        model, shape = _mlp(act=nn.ReLU, dtype=torch.float32, sizes=(6, 8, 7, 3)), (6,)
    else:
        model, shape = _cnn(pool=model_kind == "cnn_pool"), (2, 8, 8)
    data = _data(shape, dtype=torch.float32, n=2, bs=16)
    x = data[0][0]
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)

    m0 = copy.deepcopy(model)
    r0 = TINY(budget="units:4", gamma=0.0).grow(m0, data, F.cross_entropy)
    assert sum(r0.units_added.values()) == 4
    with torch.no_grad():
        assert (m0.eval()(x) - ref).abs().max() <= 1e-6
    if model_kind == "cnn_pool":
        assert set(r0.units_added) == {"0"}
        assert "pooling" in r0.extra["skipped_groups"]["3"]

    m1 = copy.deepcopy(model)
    r1 = TINY(budget="units:4").grow(m1, data, F.cross_entropy)
    assert sum(r1.units_added.values()) == 4 and r1.params_after > r1.params_before
    with torch.no_grad():
        assert (m1.eval()(x) - ref).abs().max() > 1e-3
    assert r1.loss_after < r1.loss_before

    # the grown model trains, and its new units' incoming weights get gradient
    group = next(iter(r1.units_added))
    prod = m1.get_submodule(group)
    width = r1.widths_after[group]
    assert prod.weight.shape[0] == width
    opt = torch.optim.SGD(m1.parameters(), lr=0.05)
    m1.train()
    before = mean_loss(m1, data, F.cross_entropy)
    w_new = prod.weight[width - r1.units_added[group]:].detach().clone()
    for _ in range(30):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(m1(xb), yb).backward()
            opt.step()
    assert mean_loss(m1, data, F.cross_entropy) < before - 1e-2
    assert (prod.weight[width - r1.units_added[group]:] - w_new).abs().max() > 1e-4


def test_refuses_named_group_it_cannot_grow():
    from firefly_descent.errors import GrowthError

    model, data = _cnn(pool=True), _data((2, 8, 8), dtype=torch.float32)
    with pytest.raises(GrowthError, match="pooling"):
        TINY(groups=["3"]).grow(model, data, F.cross_entropy)


# ---- the peer ----------------------------------------------------------------------------------------
def test_matches_gromo():
    pytest.importorskip("gromo", reason="the peer GroMo is not installed (pip install -e .[peers])")
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    import tiny_vs_gromo

    with warnings.catch_warnings():  # GroMo warns when it falls back to a pseudo-inverse; numbers must agree
        warnings.simplefilter("ignore")
        res = tiny_vs_gromo.compare(seed=0, sizes=(10, 6, 6, 4), n=48, batches=2)
        conv = tiny_vs_gromo.compare_conv(seed=0, n=8, batches=2)  # 3×3 stride-2 consumer
    for name, d in [*res["layers"].items(), *conv["layers"].items()]:
        assert d["neurons"] >= 2, name
        assert d["lambda_rel_err"] <= 1e-9 and d["fo_new_rel_err"] <= 1e-9 and d["fo_update_rel_err"] <= 1e-9
        assert d["max_angle_alpha"] <= 1e-6 and d["max_angle_omega"] <= 1e-6
        assert d["alpha_norm_rel_err"] <= 1e-9


def _cnn1d(dtype=torch.float64, seed=0):
    """The 1-d twin of `_cnn`: conv-BN-tanh-conv(stride 2, dilation 2)-tanh-flatten-linear on [N, 2, 12]."""
    torch.manual_seed(seed)
    body = [nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Tanh(),
            nn.Conv1d(4, 5, 3, padding=2, stride=2, dilation=2), nn.Tanh()]
    model = nn.Sequential(*body, nn.Flatten(1), nn.Linear(5 * 6, 3)).to(dtype)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _as_height_one(model1d):
    """The same network with Conv2d (1, k) kernels and BatchNorm2d, run on [N, C, 1, L] inputs."""
    c1, bn, c2, lin = model1d[0], model1d[1], model1d[3], model1d[6]
    k1 = nn.Conv2d(2, 4, (1, 3), padding=(0, 1))
    k2 = nn.Conv2d(4, 5, (1, 3), padding=(0, 2), stride=(1, 2), dilation=(1, 2))
    b2 = nn.BatchNorm2d(4)
    model = nn.Sequential(k1, b2, nn.Tanh(), k2, nn.Tanh(), nn.Flatten(1), nn.Linear(5 * 6, 3)).to(c1.weight.dtype)
    with torch.no_grad():
        for new, old in ((k1, c1), (k2, c2)):
            new.weight.copy_(old.weight.unsqueeze(2))
            new.bias.copy_(old.bias)
        b2.load_state_dict(bn.state_dict())
        model[6].load_state_dict(lin.state_dict())
    return model


def test_conv1d_is_the_height_one_conv2d():
    """TINY grows Conv1d paths (k-wide and flatten consumers) exactly as the equivalent Conv2d with (1, k)
    kernels on height-1 maps: same λ, same first-order values, same new weights and γ; the hooks' loss is the
    engine-built model's; and the 1-d first-order prediction is the finite difference of the grown loss."""
    model1d = _cnn1d()
    data1d = _data((2, 12), bs=48)
    model2d = _as_height_one(model1d)
    data2d = [(x.unsqueeze(2), y) for x, y in data1d]
    assert mean_loss(model2d, data2d, F.cross_entropy) == pytest.approx(
        mean_loss(model1d, data1d, F.cross_entropy), abs=1e-12)
    _, _, sol1 = _solve(model1d, data1d)
    _, _, sol2 = _solve(model2d, data2d)
    assert set(sol1) == set(sol2) == {"0", "3"}
    for g in sol1:
        a, b = sol1[g], sol2[g]
        assert torch.allclose(a.lambdas, b.lambdas, rtol=1e-9, atol=1e-12), g
        assert torch.allclose(a.first_order, b.first_order, rtol=1e-9, atol=1e-12), g
        assert torch.allclose(a.alpha.abs(), b.alpha.abs(), rtol=1e-7, atol=1e-10), g
        assert torch.allclose(a.omega.abs(), b.omega.abs(), rtol=1e-7, atol=1e-10), g
        assert float(a.first_order.abs().max()) > 1e-6
    for g in ("0", "3"):
        grown1, grown2 = copy.deepcopy(model1d), copy.deepcopy(model2d)
        r1 = TINY(budget="units:2", groups=[g], batches=None).grow(grown1, data1d, F.cross_entropy)
        r2 = TINY(budget="units:2", groups=[g], batches=None).grow(grown2, data2d, F.cross_entropy)
        assert r1.units_added == r2.units_added == {g: 2}
        assert r1.extra["gamma"][g] == pytest.approx(r2.extra["gamma"][g], rel=1e-9) and r1.extra["gamma"][g] > 0
        assert r1.loss_after == pytest.approx(r1.extra["line_loss"][g], abs=1e-10)  # hooks == engine
        assert r1.loss_after == pytest.approx(r2.loss_after, abs=1e-10)
        assert r1.loss_after < r1.loss_before - 1e-4
        for (n1, p1), (n2, p2) in zip(grown1.named_parameters(), grown2.named_parameters()):
            assert n1 == n2 and torch.allclose(p1, p2.reshape(p1.shape), atol=1e-10), n1
    # the prediction is the derivative of the engine-grown loss (tanh: loss(γ) = loss(0) - γ²·fo + O(γ⁴))
    gamma, g = 1e-3, "3"
    k = int(torch.argmax(sol1[g].improvement))
    grown = copy.deepcopy(model1d)
    TINY(budget="units:1", groups=[g], batches=None, gamma=gamma, update_existing=False).grow(
        grown, data1d, F.cross_entropy)
    measured = (mean_loss(grown, data1d, F.cross_entropy) - mean_loss(model1d, data1d, F.cross_entropy)) / gamma**2
    assert measured == pytest.approx(-float(sol1[g].first_order[k]), rel=1e-4)


def test_conv3d_first_order_is_the_finite_difference_and_hooks_match_engine():
    """3-d maps (video, volumes) through the same N-d closed form: the predicted decrease is the derivative of the
    engine-grown loss (tanh), the projection stays orthogonal, and the line search's loss is the grown model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 4, 3, padding=1, stride=2), nn.Tanh(),
                          nn.Flatten(1), nn.Linear(4 * 2 * 2 * 2, 3)).double()
    data = _data((1, 4, 4, 4), bs=40)
    _, _, sol = _solve(model, data)
    assert set(sol) == {"0", "2"}
    gamma = 1e-3
    for g, tg in sol.items():
        assert tg.residual_corr <= 1e-10 and float(tg.first_order.abs().max()) > 1e-6
        k = int(torch.argmax(tg.improvement))
        grown = copy.deepcopy(model)
        TINY(budget="units:1", groups=[g], batches=None, gamma=gamma, update_existing=False).grow(
            grown, data, F.cross_entropy)
        measured = (mean_loss(grown, data, F.cross_entropy) - mean_loss(model, data, F.cross_entropy)) / gamma**2
        assert measured == pytest.approx(-float(tg.first_order[k]), rel=1e-4), g
        grown = copy.deepcopy(model)
        report = TINY(budget="units:2", groups=[g], batches=None).grow(grown, data, F.cross_entropy)
        assert report.loss_after == pytest.approx(report.extra["line_loss"][g], abs=1e-10)
