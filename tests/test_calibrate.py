"""New BatchNorm channels: train mode made to compute what eval mode (and the growth method) saw."""

from __future__ import annotations

import copy

import torch
from torch import nn
from zoo import VGGFlatten, randomize_norm_stats

from firefly_descent.analysis import analyze
from firefly_descent.engine import apply, calibrate_new_batchnorm, growth_history, new_norm_channels
from firefly_descent.plan import GroupChange, NewUnits, Plan, Split


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _batch_stats(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Every BatchNorm's train-mode input statistics on `x` (mean, biased variance); running statistics restored."""
    seen, saved = {}, [{k: v.clone() for k, v in m.named_buffers()} for m in _bns(model)]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0])) for m in _bns(model)]
    was_training = model.training
    model.train()(x)
    model.train(was_training)
    for h in hooks:
        h.remove()
    for m, buf in zip(_bns(model), saved):
        for k, v in buf.items():
            getattr(m, k).copy_(v)
    return {m: (inp.mean([0, 2, 3]), inp.var([0, 2, 3], unbiased=False)) for m, inp in seen.items()}


@torch.no_grad()
def _stats_to_batch(model: nn.Module, x: torch.Tensor) -> None:
    """Set running statistics to the batch statistics on `x`: eval mode on `x` then reproduces train mode."""
    for m, (mean, var) in _batch_stats(model, x).items():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def _gap(model: nn.Module, x: torch.Tensor) -> float:
    """max |train-mode output − eval-mode output| on x, leaving running statistics untouched."""
    saved = [{k: v.clone() for k, v in m.named_buffers()} for m in _bns(model)]
    with torch.no_grad():
        train_out = model.train()(x)
        for m, buf in zip(_bns(model), saved):  # train mode moved the running statistics
            for k, v in buf.items():
                getattr(m, k).copy_(v)
        eval_out = model.eval()(x)
    return float((train_out - eval_out).abs().max())


def _grow_new_units(model: nn.Module, x: torch.Tensor, scale_in: float) -> Plan:
    """Every group gets a split (twin inserted at position 0) and 3 new units with small incoming and
    large outgoing weights (GradMax-like), two of them inserted among the old units."""
    graph = analyze(model, (x,))
    g = torch.Generator().manual_seed(1)
    changes = []
    for group in graph.groups.values():
        if not group.growable:
            continue
        incoming, outgoing = {}, {}
        for m in group.members:
            if m.kind != "weight" or m.role not in ("producer", "consumer"):
                continue
            t = dict(model.named_parameters())[m.tensor]
            shape = [3, *t.narrow(m.dim, 0, m.inner).shape]
            if m.role == "producer":
                incoming[m.tensor] = (torch.randn(shape, generator=g) * scale_in).to(t.dtype)
            else:
                outgoing[m.tensor] = torch.randn(shape, generator=g).to(t.dtype)
        new = NewUnits(3, incoming, outgoing, positions=[1, None, 0])
        changes.append(GroupChange(group, splits=[Split(0, position=0)], new=new))
    plan = Plan(changes, function_preserving=False, method="test")
    apply(model, plan, example_inputs=(x,))
    return plan


def test_new_norm_channels_follow_positions_across_plans():
    torch.manual_seed(0)
    model, x = VGGFlatten(), torch.randn(8, 3, 4, 4)
    _grow_new_units(model, x, 1e-3)
    first = new_norm_channels(model, growth_history(model))
    # unit order per group: twin of 0, new 2 (position 0), old 0, new 0 (position 1), old 1.., new 1 (appended);
    # the twin copies a calibrated channel, so it is not new
    widths = {"features.1": 4, "features.4": 5, "features.8": 6}
    assert first == {bn: [1, 3, w + 3] for bn, w in widths.items()}
    _grow_new_units(model, x, 1e-3)
    both = new_norm_channels(model, growth_history(model))
    # second plan on the grown layout (width w+4): first-plan new units move right by the units inserted
    # before them; old 0 (the first plan's twin) is not new, so neither is its twin
    for bn, w in widths.items():
        w1 = w + 4
        order = [("twin", 0), ("new", 2), ("old", 0), ("new", 0)] + [("old", i) for i in range(1, w1)] + [("new", 1)]
        fresh_before = {1, 3, w + 3}
        expect = {
            p
            for p, (kind, i) in enumerate(order)
            if kind == "new" or (kind == "old" and i in fresh_before) or (kind == "twin" and 0 in fresh_before)
        }
        assert both[bn] == sorted(expect)
    assert new_norm_channels(model, growth_history(model)[1:]) != both


def test_calibration_makes_train_mode_match_eval_mode():
    torch.manual_seed(0)
    # float64, so the comparison of the two modes is not blurred by float32 rounding of the variances
    model, x = randomize_norm_stats(VGGFlatten()).double(), torch.randn(64, 3, 4, 4, dtype=torch.float64)
    _stats_to_batch(model, x)
    assert _gap(model, x) < 1e-10  # the starting model: train mode on x == eval mode on x
    _grow_new_units(model, x, 1e-3)
    model.eval()
    with torch.no_grad():
        eval_before = model(x)
    gap_before = _gap(model, x)
    # fresh channels: eval mode y ≈ h (tiny), train mode normalises h to unit variance -> a large jump
    assert gap_before > 0.1
    channels = new_norm_channels(model, growth_history(model))
    n = calibrate_new_batchnorm(model, channels, [(x, None)])
    assert n == sum(len(v) for v in channels.values()) == 3 * 3  # 3 BatchNorm groups x 3 new units
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), eval_before, atol=1e-10)  # eval mode unchanged
    # the new channels' running statistics are exactly their train-mode batch statistics on x (the second
    # layer's new channels measured with the first layer's new channels already calibrated), so train
    # mode now computes the eval-mode map on them
    stats = _batch_stats(model, x)
    for name, idx in channels.items():
        bn = model.get_submodule(name)
        mean, var = stats[bn]
        assert torch.allclose(bn.running_mean[idx], mean[idx], atol=1e-12)
        assert torch.allclose(bn.running_var[idx], var[idx], rtol=1e-9, atol=1e-15)
    # what is left is the old channels' batch statistics moving with the (small) change of the function
    assert _gap(model, x) < gap_before / 10
    # only the listed channels changed: old channels keep their parameters and statistics
    for name, idx in channels.items():
        bn = model.get_submodule(name)
        old = [i for i in range(bn.num_features) if i not in idx]
        assert torch.all(bn.running_var[old] > 0.0)


def test_calibration_restores_mode_and_other_statistics():
    torch.manual_seed(0)
    model, x = randomize_norm_stats(VGGFlatten()), torch.randn(16, 3, 4, 4)
    _grow_new_units(model, x, 0.1)
    channels = new_norm_channels(model, growth_history(model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    calibrate_new_batchnorm(model, channels, [x, x], max_batches=1)
    assert not model.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.rsplit(".", 1)[0] in channels for k in changed)
    for name, idx in channels.items():
        bn = model.get_submodule(name)
        keep = torch.tensor([i not in idx for i in range(bn.num_features)])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(bn, attr)[keep], state[f"{name}.{attr}"][keep])
    assert calibrate_new_batchnorm(model, {}, [x]) == 0



def test_reduced_statistics_match_pooled_batches():
    """`reduce` sees the per-channel sums: adding the other replica's sums equals calibrating on both batches."""
    torch.manual_seed(0)
    model, x = randomize_norm_stats(VGGFlatten()).double(), torch.randn(32, 3, 4, 4, dtype=torch.float64)
    _grow_new_units(model, x, 0.1)
    channels = new_norm_channels(model, growth_history(model))
    pooled = copy.deepcopy(model)
    calibrate_new_batchnorm(pooled, channels, [x[:16], x[16:]])
    other: list[torch.Tensor] = []  # the sums the replica holding x[16:] would contribute, one per BatchNorm
    calibrate_new_batchnorm(copy.deepcopy(model), channels, [x[16:]], reduce=lambda t: other.append(t) or t)
    assert len(other) == len(channels)
    calls = iter(other)
    replica = copy.deepcopy(model)
    calibrate_new_batchnorm(replica, channels, [x[:16]], reduce=lambda t: t + next(calls))
    for a, b in zip(pooled.state_dict().values(), replica.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12)


def test_new_channels_follow_a_module_wrapped_by_a_new_layer():
    """A new layer inserted after a BatchNorm wraps it (`features.1` -> `features.1.0`) in the same plan."""
    from firefly_descent.engine import deepen

    torch.manual_seed(0)
    model, x = randomize_norm_stats(VGGFlatten()), torch.randn(8, 3, 4, 4)
    _grow_new_units(model, x, 1e-3)
    deepen(model, (x,), ["features.1"])
    channels = new_norm_channels(model, growth_history(model))
    assert "features.1.0" in channels and "features.1" not in channels
    assert isinstance(model.get_submodule("features.1.0"), nn.BatchNorm2d)
    assert calibrate_new_batchnorm(model, channels, [x]) == 9


class CatBN(nn.Module):
    """Two branches concatenated and normalised by ONE BatchNorm: each group owns a slice at an offset."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 3, 1, bias=False)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.conv_c = nn.Conv2d(7, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], dim=1)))
        return self.conv_c(y).mean(dim=(2, 3))


def test_new_channels_of_a_concatenation_use_the_groups_offsets():
    torch.manual_seed(0)
    model, x = randomize_norm_stats(CatBN()).double(), torch.randn(16, 3, 5, 5, dtype=torch.float64)
    graph = analyze(model, (x,))
    by_producer = {g.modules[0]: g for g in graph.groups.values() if g.growable and g.modules}
    a, b = by_producer["conv_a"], by_producer["conv_b"]
    g = torch.Generator().manual_seed(0)

    def new_units(group, count, positions):
        params = dict(model.named_parameters())
        incoming = {
            m.tensor: torch.randn(count, *params[m.tensor].narrow(m.dim, 0, m.inner).shape, generator=g,
                                  dtype=torch.float64) * 1e-3
            for m in group.members
            if m.role == "producer" and m.kind == "weight"
        }
        return NewUnits(count, incoming, positions=positions)

    plan = Plan(
        [GroupChange(a, new=new_units(a, 2, None)), GroupChange(b, splits=[Split(1)], new=new_units(b, 1, [0]))],
        function_preserving=True,
    )
    apply(model, plan, example_inputs=(x,))
    # layout: a0 a1 a2 newA0 newA1 | newB0 b0 b1 b2 b3 twin(b1): the second group's units moved by 2
    channels = new_norm_channels(model, growth_history(model))
    assert channels == {"bn": [3, 4, 5]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        before = model(x)
    assert calibrate_new_batchnorm(model, channels, [x]) == 3
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), before, atol=1e-10)
    old = [i for i in range(11) if i not in (3, 4, 5)]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(model.bn, attr)[old], state[f"bn.{attr}"][old])
    mean, var = _batch_stats(model, x)[model.bn]
    assert torch.allclose(model.bn.running_mean[[3, 4, 5]], mean[[3, 4, 5]], atol=1e-12)
    assert torch.allclose(model.bn.running_var[[3, 4, 5]], var[[3, 4, 5]], rtol=1e-9, atol=1e-15)
