"""Per-unit data for the splitting and GradMax baselines, read with temporary hooks.

Both methods look at a unit i as  x --producer--> h_i --BatchNorm (optional)--> y_i --activation--> a_i.
`find_paths` finds, for each group, the producer (one Linear or ungrouped Conv1d/Conv2d, or for
groups that pass through a depthwise conv, that depthwise conv: see `find_paths`), its BatchNorm
and the activation *module* that follows it in execution order; groups that do not have this shape
(several producers tied by a residual add, no activation module right after the producer,
LayerNorm/GroupNorm, ...) are reported with a reason and left alone. `verify_paths` checks
numerically that the activation's input really is the BatchNorm of the producer's output
(y = c·h + d), so a wrong guess can never go unnoticed.

`collect` runs the model in eval mode (BatchNorm statistics frozen, so BN is the per-unit affine map
y = c·h + d) and yields, per batch and group, with positions (batch × spatial) as rows:
  X  [n, D]  the producer's input patch of every output position (F.unfold for convs), plus a
             column of ones when the producer has a bias: a unit's incoming weights are a vector in R^D
             ([n, C, D] for a depthwise producer: unit c's patch of its own channel)
  y  [n, C]  the activation's input
  g  [n, C]  dL/da, the loss gradient at the activation's *output*: the forward hook returns
             `a + z` with z a zero leaf tensor and dL/dz is read with `torch.autograd.grad`, which is
             exact whatever follows (later in-place ops, pooling, flatten) and never touches `.grad`
  c  [C]     the BatchNorm scale γ/sqrt(running_var + eps) (ones without BatchNorm)
Hooks live only for the duration of one pass; the model is left exactly as it was.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.graph import Group, Member
from ...errors import GrowthError
from ..base import LossFn, as_inputs
from ._common import forward_with_hooks

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardswish,
)


@dataclass
class UnitPath:
    """Where one group's units are computed: producer -> (BatchNorm) -> activation (its `act_call`-th call)."""

    group: Group
    producer: str
    weight: str
    bias: str | None
    norm: str | None
    act: str
    act_call: int
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


def _leaf_call_order(model: nn.Module, x: tuple[torch.Tensor, ...]) -> list[str]:
    order: list[str] = []

    def record(name: str) -> Any:
        return lambda _m, _i, _o: order.append(name)

    leaves = {name: record(name) for name, m in model.named_modules() if name and not any(True for _ in m.children())}
    forward_with_hooks(model, x, leaves)
    return order


def _producer_reason(m: nn.Module, depthwise: bool = False) -> str | None:
    if isinstance(m, nn.Linear) and not depthwise:
        return None
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if depthwise and not (m.groups == m.in_channels == m.out_channels):
            return "its per-channel layer is not a depthwise convolution with one filter per channel"
        if not depthwise and m.groups != 1:
            return "its producer is a grouped convolution"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "its producer uses non-zero or string padding"
        return None
    return f"its producer is a {type(m).__name__} (Linear, Conv1d or Conv2d needed)"


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

    In a group whose units pass through a depthwise convolution (MobileNet), the unit is the
    depthwise neuron (its k×k filter over its own channel); the layer before it is copied exactly
    by a split, so the split pair's outputs still meet only in the (halved) consumer. With
    `depthwise=False` such groups are skipped.
    """
    order = _leaf_call_order(model, x)
    modules = dict(model.named_modules())
    counts: dict[str, int] = defaultdict(int)
    for n in order:
        counts[n] += 1
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
            if counts[pname] != 1:
                why = "its producer runs more than once per forward"
            else:
                i = order.index(pname) + 1
                norm = order[i] if i < len(order) and order[i] in norms else None
                if norm is not None:
                    nm = modules[norm]
                    if not isinstance(nm, nn.modules.batchnorm._BatchNorm) or nm.running_mean is None:
                        why = "its normalisation is not a BatchNorm with running statistics"
                    elif counts[norm] != 1:
                        why = "its BatchNorm runs more than once per forward"
                    i += 1
                elif not dw and norms:
                    why = "its normalisation layer does not directly follow the producer"
                if why is None and (i >= len(order) or not isinstance(modules[order[i]], ACTIVATIONS)):
                    why = "no activation module directly follows the producer (and its BatchNorm)"
                if why is None:
                    act = order[i]
                    bias = biases[0].tensor if biases else None
                    paths[g.name] = UnitPath(g, pname, weights[0].tensor, bias, norm, act, order[:i].count(act), dw)
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


def _rows(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """[..., C] (Linear) or [B, C, *spatial] (conv) -> [positions, C]."""
    if linear:
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def patches(model: nn.Module, path: UnitPath, inp: torch.Tensor) -> torch.Tensor:
    """The producer's input as rows in the order of `_rows` of its output: [positions, D] shared by all
    units, or [positions, C, D] for a depthwise producer (each unit sees its own channel)."""
    p = model.get_submodule(path.producer)
    if isinstance(p, nn.Linear):
        X = inp.reshape(-1, inp.shape[-1])
    else:
        if isinstance(p, nn.Conv1d):
            inp = inp.unsqueeze(-2)
            k, d, pad, s = (1, *p.kernel_size), (1, *p.dilation), (0, *p.padding), (1, *p.stride)
        else:
            k, d, pad, s = p.kernel_size, p.dilation, p.padding, p.stride
        cols = F.unfold(inp, k, dilation=d, padding=pad, stride=s)  # [B, C_in*kk, L]
        if path.depthwise:
            B, _, L = cols.shape
            X = cols.reshape(B, p.out_channels, -1, L).permute(0, 3, 1, 2).reshape(B * L, p.out_channels, -1)
        else:
            X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if path.bias:
        X = torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype, device=X.device)], -1)
    return X


@dataclass
class UnitData:
    X: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    c: torch.Tensor


class _Hooks:
    """Temporary hooks capturing producer inputs, activation inputs and dL/da for some paths."""

    def __init__(self, model: nn.Module, paths: dict[str, UnitPath], want_h: bool = False) -> None:
        self.model, self.paths, self.want_h = model, paths, want_h
        self.cap: dict[str, dict[str, torch.Tensor]] = {n: {} for n in paths}
        self.calls: dict[str, int] = defaultdict(int)
        self.handles: list[Any] = []
        by_act: dict[str, dict[int, str]] = defaultdict(dict)
        for n, p in paths.items():
            by_act[p.act][p.act_call] = n
            prod = model.get_submodule(p.producer)
            self.handles.append(prod.register_forward_hook(self._producer_hook(n)))
        for act, which in by_act.items():
            m = model.get_submodule(act)
            self.handles.append(m.register_forward_pre_hook(self._act_pre(act, which)))
            self.handles.append(m.register_forward_hook(self._act_post(act, which)))

    def _producer_hook(self, n: str) -> Any:
        def hook(_m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> None:
            self.cap[n]["x"] = inp[0].detach()
            if self.want_h:
                self.cap[n]["h"] = out.detach().clone()
        return hook

    def _act_pre(self, act: str, which: dict[int, str]) -> Any:
        def hook(_m: nn.Module, inp: tuple[Any, ...]) -> None:
            n = which.get(self.calls[act])
            if n is not None:
                self.cap[n]["y"] = inp[0].detach().clone()  # clone: in-place activations overwrite it
        return hook

    def _act_post(self, act: str, which: dict[int, str]) -> Any:
        def hook(_m: nn.Module, _inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            n = which.get(self.calls[act])
            self.calls[act] += 1
            if n is None:
                return None
            z = torch.zeros_like(out, requires_grad=True)
            self.cap[n]["z"] = z
            return out + z
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
    hooks = _Hooks(model, paths, want_h=True)
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            _forward(model, batch, None)
    finally:
        model.train(was)
        hooks.remove()
    for n, p in list(paths.items()):
        cap = hooks.cap[n]
        if "h" not in cap or "y" not in cap or cap["h"].shape != cap["y"].shape:
            skipped[n] = f"{method} does not apply: the activation after {p.producer!r} sees another tensor"
        else:
            lin = isinstance(model.get_submodule(p.producer), nn.Linear)
            h, y = _rows(cap["h"], lin), _rows(cap["y"], lin)
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
        hooks = _Hooks(model, paths)
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                loss = _forward(model, batch, loss_fn)
                names = [n for n in paths if "z" in hooks.cap[n]]
                missing = [n for n in paths if n not in names]
                if missing:
                    raise GrowthError(f"the activation of group {missing[0]!r} did not run on a growth batch")
                grads = torch.autograd.grad(loss, [hooks.cap[n]["z"] for n in names], allow_unused=True)
        finally:
            hooks.remove()
            model.train(was)
        out = {}
        for n, gz in zip(names, grads):
            p, cap = paths[n], hooks.cap[n]
            lin = isinstance(model.get_submodule(p.producer), nn.Linear)
            y = _rows(cap["y"], lin)
            g = torch.zeros_like(y) if gz is None else _rows(gz, lin)
            out[n] = UnitData(patches(model, p, cap["x"]), y, g, bn_affine(model, p, y)[0])
        yield out
