"""Per-unit data for the splitting and GradMax baselines, read with temporary hooks.

Both methods look at a unit i as  x --producer--> h_i --BatchNorm (optional)--> y_i --activation--> a_i.
`find_paths` finds, for each group, the producer (a layer whose rule says how its input unfolds:
Linear, ungrouped Conv1d/2d/3d, a user's layer with such a rule; for groups that pass through a
depthwise conv, that depthwise conv: see `find_paths`), its BatchNorm and the activation that reads its
output, by data flow: the activation (a module such as nn.ReLU or a call such as F.relu, torch.tanh,
x.relu(): anything in the activation registry) whose input tensor *is* the BatchNorm's (or producer's)
output. Groups that do not have this shape (several producers tied by a residual add, no activation
reading the producer's output, LayerNorm/GroupNorm, ...) are reported with a reason and left alone.
`verify_paths` checks numerically that the activation's input really is the BatchNorm of the
producer's output (y = c·h + d), so a wrong guess can never go unnoticed.

`collect` runs the model in eval mode (BatchNorm statistics frozen, so BN is the per-unit affine map
y = c·h + d) and yields, per batch and group, with positions (batch × spatial) as rows:
  X  [n, D]  the producer's input patch of every output position (its rule's `unfold_input`: F.unfold
             for convs), plus a column of ones when the producer has a bias: a unit's incoming weights
             are a vector in R^D ([n, C, D] for a depthwise producer: unit c's patch of its own channel)
  y  [n, C]  the activation's input
  g  [n, C]  dL/da, the loss gradient at the activation's *output*: the activation call (intercepted by
             an `ActivationMode`) returns `a + z` with z a zero leaf tensor and dL/dz is read with
             `torch.autograd.grad`, which is exact whatever follows (later in-place ops, pooling,
             flatten) and never touches `.grad`
  c  [C]     the BatchNorm scale γ/sqrt(running_var + eps) (ones without BatchNorm)
Hooks live only for the duration of one pass; the model is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...analysis.activations import Activation, ActivationCall, ActivationMode, activation_of
from ...analysis.graph import Group, Member
from ...analysis.rules import LayerRule, is_batchnorm, rule_for
from ...errors import GrowthError
from ..base import LossFn, as_inputs


def layer_rule(m: nn.Module) -> LayerRule:
    """The rule of `m`, or the base rule (whose answers say it is not a weight-times-unfolded-input layer)."""
    return rule_for(m) or LayerRule()


@dataclass
class UnitPath:
    """Where one group's units are computed: producer -> (BatchNorm) -> activation (`act` names it)."""

    group: Group
    producer: str
    weight: str
    bias: str | None
    norm: str | None
    act: str
    activation: ActivationCall
    depthwise: bool = False  # the unit is a depthwise neuron: its input is its own channel only

    def weight_numel(self, model: nn.Module) -> int:
        w = model.get_submodule(self.producer).weight
        return int(w[0].numel())

    def dim(self, model: nn.Module) -> int:
        """D: length of a unit's incoming-weight vector (weights, then the bias if any)."""
        return self.weight_numel(model) + (1 if self.bias else 0)

    def vector_to_slices(self, model: nn.Module, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split incoming-weight vectors [..., D] into plan slices {weight: [..., 1, *w], bias: [..., 1]}."""
        w = model.get_submodule(self.producer).weight
        n = int(w[0].numel())
        out = {self.weight: v[..., :n].reshape(*v.shape[:-1], 1, *w.shape[1:])}
        if self.bias:
            out[self.bias] = v[..., n:n + 1]
        return out

    def incoming(self, model: nn.Module) -> torch.Tensor:
        """Current incoming-weight vectors of all units, [C, D]."""
        p = model.get_submodule(self.producer)
        w = p.weight.detach().reshape(p.weight.shape[0], -1)
        if self.bias:
            w = torch.cat([w, p.bias.detach().reshape(-1, 1)], 1)
        return w


@dataclass
class _Flow:
    """One forward's data flow: each leaf module call (name, first input, output) and each activation call
    (its input, the call), holding the tensors so that identity (`is`) comparisons stay valid."""

    calls: list[tuple[str, Any, Any]]
    acts: list[tuple[torch.Tensor, ActivationCall]]

    def count(self, name: str) -> int:
        return sum(1 for n, _, _ in self.calls if n == name)

    def output(self, name: str) -> Any:
        return next(o for n, _, o in self.calls if n == name)

    def readers(self, t: Any) -> list[str]:
        return [n for n, i, _ in self.calls if i is t]

    def activation_reading(self, t: Any) -> ActivationCall | None:
        return next((c for i, c in self.acts if i is t), None)


def _flow(model: nn.Module, x: tuple[torch.Tensor, ...]) -> _Flow:
    """Run the model once (eval, no grad) recording `_Flow`. An activation call made inside an activation
    module's forward is named by that module; a functional one by its function and the module before it."""
    calls: list[tuple[str, Any, Any]] = []
    acts: list[tuple[torch.Tensor, ActivationCall]] = []
    inside: list[str] = []
    handles = []

    def record(name: str) -> Any:
        def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            calls.append((name, inp[0] if inp else None, out))
        return hook

    def enter(name: str) -> Any:
        return lambda _m, _i: inside.append(name)

    def leave(_m: nn.Module, _i: Any, _o: Any) -> None:
        inside.pop()

    def on_act(act: Activation, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        where = inside[-1] if inside else f"{act.name}() after {calls[-1][0] if calls else 'the input'!r}"
        acts.append((args[0], ActivationCall(act, act.bind(args[1:], kwargs), where)))
        return None

    for name, m in model.named_modules():
        if name and activation_of(m) is not None:
            handles.append(m.register_forward_pre_hook(enter(name)))
            handles.append(m.register_forward_hook(leave))
        if name and not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(record(name)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), ActivationMode(on_act):
            model(*x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return _Flow(calls, acts)


def _producer_reason(m: nn.Module, depthwise: bool = False) -> str | None:
    rule = layer_rule(m)
    why = rule.unfold_reason(m)
    if why is not None:
        return f"its {'per-channel layer' if depthwise else 'producer'} {why}"
    if depthwise and not rule.per_channel(m):
        return "its per-channel layer is not a depthwise convolution with one filter per channel"
    if not depthwise and rule.per_channel(m):
        return "its producer is a grouped convolution"
    return None


def _structure(g: Group) -> tuple[str | None, list[Member], list[Member], bool]:
    """(reason it does not fit, weight members, bias members, depthwise) of the unit's computing layer."""
    role = "producer"
    depthwise = any(m.role == "passthrough" for m in g.members)
    if depthwise:
        role = "passthrough"  # the unit is the depthwise neuron; the layer before it is copied exactly
        if len({m.module for m in g.members if m.role == "passthrough"}) != 1:
            return "its units pass through several per-channel layers", [], [], True
    weights = [m for m in g.members if m.role == role and m.kind == "weight"]
    biases = [m for m in g.members if m.role == role and m.kind != "weight"]
    if any(m.role == "elementwise" for m in g.members):
        return "its units are combined elementwise with a parameter", weights, biases, depthwise
    if g.constraints:
        return f"it is normalised by {g.constraints[0].kind}", weights, biases, depthwise
    if any(m.inner != 1 for m in weights):  # rules that grow whole blocks (attention heads, KV groups)
        rows = max(m.inner for m in weights)
        return f"each unit is a block of {rows} rows (an attention head), not one neuron", weights, biases, depthwise
    if not depthwise and len(weights) != 1:
        return f"it has {len(weights)} producers (residual add or concatenation)", weights, biases, depthwise
    if len(weights) != 1 or weights[0].dim != 0 or weights[0].inner != 1 or any(
            b.module != weights[0].module for b in biases):
        return "its producer layout is not [units, fan-in]", weights, biases, depthwise
    return None, weights, biases, depthwise


def find_paths(
    model: nn.Module, groups: list[Group], x: tuple[torch.Tensor, ...], method: str, depthwise: bool = True
) -> tuple[dict[str, UnitPath], dict[str, str]]:
    """Paths of the groups that fit `producer -> (BatchNorm) -> activation`, and why the others do not.

    The BatchNorm is the group's norm layer whose input is the producer's output tensor; the activation is
    the registered activation (module or functional call) whose input is the BatchNorm's (or producer's)
    output tensor. In a group whose units pass through a depthwise convolution (MobileNet), the unit is the
    depthwise neuron (its k×k filter over its own channel); the layer before it is copied exactly
    by a split, so the split pair's outputs still meet only in the (halved) consumer. With
    `depthwise=False` such groups are skipped.
    """
    flow = _flow(model, x)
    modules = dict(model.named_modules())
    paths: dict[str, UnitPath] = {}
    skipped: dict[str, str] = {}
    for g in groups:
        why, weights, biases, dw = _structure(g)
        if why is None and dw and not depthwise:
            why = "its units pass through a per-channel (depthwise) layer before their consumers"
        if why is None:
            pname = weights[0].module
            why = _producer_reason(modules[pname], dw)
        if why is None:
            norms = {m.module for m in g.members if m.role == "norm"}
            if flow.count(pname) != 1:
                why = "its producer runs more than once per forward"
            else:
                t = flow.output(pname)
                norm = next((n for n in flow.readers(t) if n in norms), None)
                if norm is not None:
                    nm = modules[norm]
                    if not is_batchnorm(nm) or nm.running_mean is None:
                        why = "its normalisation is not a BatchNorm with running statistics"
                    elif flow.count(norm) != 1:
                        why = "its BatchNorm runs more than once per forward"
                    else:
                        t = flow.output(norm)
                elif not dw and norms:
                    why = "its normalisation layer does not directly follow the producer"
                act = flow.activation_reading(t) if why is None else None
                if why is None and act is None:
                    why = "no activation reads the output of the producer (and its BatchNorm)"
                if why is None:
                    assert act is not None
                    bias = biases[0].tensor if biases else None
                    paths[g.name] = UnitPath(g, pname, weights[0].tensor, bias, norm, act.where, act, dw)
        if why is not None:
            skipped[g.name] = f"{method} does not apply: {why}"
    return paths, skipped


def bn_affine(model: nn.Module, path: UnitPath, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = c·h + d per unit (c = 1, d = 0 without BatchNorm)."""
    w = model.get_submodule(path.producer).weight
    C = w.shape[0]
    if path.norm is None:
        return torch.ones(C, dtype=like.dtype, device=like.device), torch.zeros(C, dtype=like.dtype, device=like.device)
    bn = model.get_submodule(path.norm)
    inv = torch.rsqrt(bn.running_var.detach().to(like.dtype) + bn.eps)
    gamma = bn.weight.detach().to(like.dtype) if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach().to(like.dtype) if bn.bias is not None else torch.zeros_like(inv)
    c = gamma * inv
    return c, beta - c * bn.running_mean.detach().to(like.dtype)


def rows(model: nn.Module, path: UnitPath, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the producer's output as [positions, C] (its rule's `output_rows`)."""
    p = model.get_submodule(path.producer)
    return layer_rule(p).output_rows(p, t)


def patches(model: nn.Module, path: UnitPath, inp: torch.Tensor) -> torch.Tensor:
    """The producer's input as rows in the order of `rows` of its output: [positions, D] shared by all
    units, or [positions, C, D] for a depthwise producer (each unit sees its own channel); a column of
    ones for the bias last (the producer's rule's `unfold_input`)."""
    p = model.get_submodule(path.producer)
    return layer_rule(p).unfold_input(p, inp)


@dataclass
class UnitData:
    X: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    c: torch.Tensor


class Hooks:
    """Temporary hooks capturing, per path: the producer's input `x` (and output `h` with `want_h`), the
    activation's input `y` and output `a` (`want_a`), and a zero leaf `z` added to the activation's output
    (`want_z`), whose gradient is dL/da. The activation is found by data flow: the activation call whose
    input is the BatchNorm's (or the producer's) output tensor of this forward; its result is replaced by
    `a + z`, so a functional in-place call whose result the model ignores (`F.relu(x, inplace=True)` as a bare
    statement) would read dL/da = 0. Use as a context manager around one forward."""

    def __init__(
        self, model: nn.Module, paths: dict[str, UnitPath], want_h: bool = False, want_a: bool = False,
        want_z: bool = True,
    ) -> None:
        self.want_h, self.want_a, self.want_z = want_h, want_a, want_z
        self.cap: dict[str, dict[str, torch.Tensor]] = {n: {} for n in paths}
        self.expect: list[tuple[torch.Tensor, str]] = []  # (tensor an activation should read, path)
        self.handles: list[Any] = []
        for n, p in paths.items():
            prod = model.get_submodule(p.producer)
            self.handles.append(prod.register_forward_hook(self._producer_hook(n, p.norm is None)))
            if p.norm is not None:
                self.handles.append(model.get_submodule(p.norm).register_forward_hook(self._norm_hook(n)))
        self.mode = ActivationMode(self._on_act)

    def _producer_hook(self, n: str, last: bool) -> Any:
        def hook(_m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> None:
            self.cap[n]["x"] = inp[0].detach()
            if self.want_h:
                self.cap[n]["h"] = out.detach().clone()
            if last:
                self.expect.append((out, n))
        return hook

    def _norm_hook(self, n: str) -> Any:
        def hook(_m: nn.Module, _inp: tuple[Any, ...], out: torch.Tensor) -> None:
            self.expect.append((out, n))
        return hook

    def _on_act(self, act: Activation, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        i = next((i for i, (t, _) in enumerate(self.expect) if t is args[0]), None)
        if i is None:
            return None
        n = self.expect.pop(i)[1]
        self.cap[n]["y"] = args[0].detach().clone()  # clone: in-place activations overwrite it
        out = func(*args, **kwargs)
        if self.want_a:
            self.cap[n]["a"] = out.detach().clone()
        if self.want_z:
            z = torch.zeros_like(out, requires_grad=True)
            self.cap[n]["z"] = z
            out = out + z
        return out

    def __enter__(self) -> Hooks:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.expect.clear()


def _forward(model: nn.Module, batch: tuple[Any, Any], loss_fn: LossFn | None) -> torch.Tensor | None:
    x, y = batch
    out = model(*as_inputs(x))
    return loss_fn(out, y) if loss_fn is not None else None


def verify_paths(
    model: nn.Module, paths: dict[str, UnitPath], batch: tuple[Any, Any], method: str
) -> dict[str, str]:
    """Drop (and explain) paths whose activation input is not BatchNorm(producer output) numerically."""
    skipped: dict[str, str] = {}
    if not paths:
        return skipped
    was = model.training
    try:
        model.eval()
        with torch.no_grad(), Hooks(model, paths, want_h=True) as hooks:
            _forward(model, batch, None)
    finally:
        model.train(was)
    for n, p in list(paths.items()):
        cap = hooks.cap[n]
        if "h" not in cap or "y" not in cap or cap["h"].shape != cap["y"].shape:
            skipped[n] = f"{method} does not apply: the activation after {p.producer!r} sees another tensor"
        else:
            h, y = rows(model, p, cap["h"]), rows(model, p, cap["y"])
            c, d = bn_affine(model, p, h)
            if not torch.allclose(c * h + d, y, rtol=1e-3, atol=1e-4 * (1 + float(y.abs().max()))):
                skipped[n] = f"{method} does not apply: ops between {p.producer!r} and its activation {p.act!r}"
        if n in skipped:
            del paths[n]
    return skipped


def collect(
    model: nn.Module, paths: dict[str, UnitPath], batches: list[tuple[Any, Any]], loss_fn: LossFn
) -> Iterator[dict[str, UnitData]]:
    """Per batch, the `UnitData` of every path (see module docstring). Eval mode, hooks removed after."""
    if not paths:
        return
    for batch in batches:
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                with Hooks(model, paths) as hooks:
                    loss = _forward(model, batch, loss_fn)
                names = [n for n in paths if "z" in hooks.cap[n]]
                missing = [n for n in paths if n not in names]
                if missing:
                    raise GrowthError(f"the activation of group {missing[0]!r} did not run on a growth batch")
                grads = torch.autograd.grad(loss, [hooks.cap[n]["z"] for n in names], allow_unused=True)
        finally:
            model.train(was)
        out = {}
        for n, gz in zip(names, grads):
            p, cap = paths[n], hooks.cap[n]
            y = rows(model, p, cap["y"])
            g = torch.zeros_like(y) if gz is None else rows(model, p, gz)
            out[n] = UnitData(patches(model, p, cap["x"]), y, g, bn_affine(model, p, y)[0])
        yield out
