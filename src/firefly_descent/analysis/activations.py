"""The one activation registry: which modules and functions are element-wise activations, and what the
growth methods need to know about each.

An `Activation` is registered once (`register_activation`) with its functional form (`F.relu`), the
module that calls it (`nn.ReLU`, subclasses included), its other spellings (`torch.relu`, `Tensor.relu`,
the traced method name `"relu"`), and the facts the methods read: whether an identity-initialised
Linear/Conv + ReLU after it is exact (`relu_like`: outputs >= 0), whether a new layer may follow it
(`depth_host`), and the surrogate second derivative splitting uses at its kinks (`kink_d2`). The one call
also teaches the analysis that units flow through it (a pass-through module rule and an element-wise
function rule), so a new activation is one call in one file.

Modules call their functional form (`nn.ReLU.forward` calls `F.relu`, `nn.ReLU6` calls `F.hardtanh`), so a
`torch.overrides.TorchFunctionMode` sees module and functional activations alike: `ActivationMode` is how
the growth methods find an activation by data flow (`methods/baselines/_probe.py`). A user's own activation
function must dispatch `__torch_function__` for that (`torch.overrides.wrap_torch_function`); torch's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import shapeops
from .rules import PassThroughRule, register_rule, unregister_rule

KinkD2 = Callable[[torch.Tensor, dict[str, Any], float], torch.Tensor]


def softplus_d2(y: torch.Tensor, beta: float = 3.0) -> torch.Tensor:
    """Second derivative of softplus_β(y) = log(1 + e^{βy})/β: β·s(1 − s), s = sigmoid(βy)."""
    s = torch.sigmoid(beta * y)
    return beta * s * (1 - s)


@dataclass(frozen=True)
class Activation:
    """One element-wise activation and what the growth methods need to know about it.

    name: the short name configs and inserted bodies use ("relu").
    function: its functional form, called as `function(y, **params)`.
    module: its module form (subclasses count), or None.
    params: the call's parameter names after the input, in positional order (`inplace` is read and dropped).
    aliases: other functions with the same meaning (`torch.relu`, `torch.Tensor.relu`).
    methods: tensor-method names in a traced graph ("relu").
    relu_like: outputs >= 0 and ReLU-shaped: an identity-initialised Linear/Conv + ReLU after it is exact.
    depth_host: a new layer may be inserted after its module (depth boundaries).
    kink_d2: (y, params, beta) -> surrogate σ''(y) at kinks (softplus(β)); None = exact σ'' by autograd.
    """

    name: str
    function: Callable[..., torch.Tensor]
    module: type[nn.Module] | None = None
    params: tuple[str, ...] = ()
    aliases: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    relu_like: bool = False
    depth_host: bool = False
    kink_d2: KinkD2 | None = None

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The parameters of one call `function(y, *args, **kwargs)` by name, without `inplace`."""
        out = dict(zip(self.params, args))
        out.update(kwargs)
        out.pop("inplace", None)
        return out


@dataclass(frozen=True)
class ActivationCall:
    """One call of a registered activation: the activation, its parameters, and where it ran (for messages)."""

    activation: Activation
    params: dict[str, Any]
    where: str

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.activation.function(y, **self.params)

    def second_derivative(self, y: torch.Tensor, beta: float = 3.0) -> torch.Tensor:
        """σ''(y): exact when smooth (autograd), the softplus(β) surrogate at ReLU-like kinks."""
        if self.activation.kink_d2 is not None:
            return self.activation.kink_d2(y, self.params, beta)
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            (d1,) = torch.autograd.grad(self(yy).sum(), yy, create_graph=True)
            (d2,) = torch.autograd.grad(d1.sum(), yy, allow_unused=True)
        return torch.zeros_like(y) if d2 is None else d2.detach()


ACTIVATIONS: dict[str, Activation] = {}  # name -> activation
_BY_FUNCTION: dict[Any, Activation] = {}
_BY_MODULE: dict[type[nn.Module], Activation] = {}


def _elementwise(a: Any, node: Any) -> Any:
    return shapeops.elementwise(a, node, "add")


def register_activation(act: Activation) -> Activation:
    """Register an element-wise activation: the methods, the analysis (units pass through) and the names."""
    ACTIVATIONS[act.name] = act
    for f in (act.function, *act.aliases):
        _BY_FUNCTION[f] = act
        shapeops.register_function_rule(f, _elementwise)
    for m in act.methods:
        shapeops.register_function_rule(m, _elementwise)
    if act.module is not None:
        _BY_MODULE[act.module] = act
        register_rule(act.module, PassThroughRule())
    return act


def unregister_activation(name: str) -> None:
    act = ACTIVATIONS.pop(name, None)
    if act is None:
        return
    for f in (act.function, *act.aliases):
        _BY_FUNCTION.pop(f, None)
        shapeops.FUNCTION_RULES.pop(f, None)
    for m in act.methods:
        shapeops.METHOD_RULES.pop(m, None)
    if act.module is not None:
        _BY_MODULE.pop(act.module, None)
        unregister_rule(act.module)


def activation_of_function(f: Any) -> Activation | None:
    """The activation a function (`F.relu`, `torch.tanh`, `torch.Tensor.relu`) computes, or None."""
    try:
        return _BY_FUNCTION.get(f)
    except TypeError:  # an unhashable callable is no registered activation
        return None


def activation_of(m: nn.Module | None) -> Activation | None:
    """The activation a module computes (its most specific registered type), or None."""
    if m is None:
        return None
    for t in type(m).__mro__:
        act = _BY_MODULE.get(t)
        if act is not None:
            return act
    return None


def is_activation(m: nn.Module | None) -> bool:
    return activation_of(m) is not None


def activation_module(name: str) -> type[nn.Module]:
    """The module class of an activation by short name ("identity" is nn.Identity); KeyError if unknown."""
    if name == "identity":
        return nn.Identity
    act = ACTIVATIONS[name]
    if act.module is None:
        raise KeyError(name)
    return act.module


def activation_names() -> list[str]:
    """Short names `activation_module` accepts."""
    return sorted([n for n, a in ACTIVATIONS.items() if a.module is not None] + ["identity"])


class ActivationMode(TorchFunctionMode):
    """Calls `on_call(activation, func, args, kwargs)` for every call of a registered activation (module or
    functional) inside the `with` block; its return value replaces the call's result unless it is None.
    Every other call runs unchanged."""

    def __init__(self, on_call: Callable[[Activation, Any, tuple[Any, ...], dict[str, Any]], Any]) -> None:
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        act = activation_of_function(func)
        if act is not None and args and isinstance(args[0], torch.Tensor):
            out = self.on_call(act, func, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _relu_d2(y: torch.Tensor, p: dict[str, Any], beta: float) -> torch.Tensor:
    return softplus_d2(y, beta)


def _hardtanh_d2(y: torch.Tensor, p: dict[str, Any], beta: float) -> torch.Tensor:
    return softplus_d2(y - p.get("min_val", -1.0), beta) - softplus_d2(y - p.get("max_val", 1.0), beta)


def _relu6_d2(y: torch.Tensor, p: dict[str, Any], beta: float) -> torch.Tensor:
    return softplus_d2(y - 0.0, beta) - softplus_d2(y - 6.0, beta)


def _leaky_d2(y: torch.Tensor, p: dict[str, Any], beta: float) -> torch.Tensor:
    return (1 - p.get("negative_slope", 0.01)) * softplus_d2(y, beta)


def _softplus_d2(y: torch.Tensor, p: dict[str, Any], beta: float) -> torch.Tensor:
    return softplus_d2(y, float(p.get("beta", 1.0)))


def builtin() -> Iterator[Activation]:
    """The built-in activations (registered when this module is imported)."""
    A = Activation
    # (`x.relu_()` is traced as element-wise, but the probe does not take it: code may ignore its return value,
    # and dL/da is read by replacing the call's result)
    yield A("relu", F.relu, nn.ReLU, ("inplace",), (torch.relu, torch.Tensor.relu), ("relu", "relu_"),
            relu_like=True, depth_host=True, kink_d2=_relu_d2)
    yield A("relu6", F.relu6, nn.ReLU6, ("inplace",), relu_like=True, depth_host=True, kink_d2=_relu6_d2)
    yield A("hardtanh", F.hardtanh, nn.Hardtanh, ("min_val", "max_val", "inplace"), kink_d2=_hardtanh_d2)
    yield A("leaky_relu", F.leaky_relu, nn.LeakyReLU, ("negative_slope", "inplace"), depth_host=True,
            kink_d2=_leaky_d2)
    yield A("softplus", F.softplus, nn.Softplus, ("beta", "threshold"), kink_d2=_softplus_d2)
    yield A("gelu", F.gelu, nn.GELU, ("approximate",), depth_host=True)
    yield A("silu", F.silu, nn.SiLU, ("inplace",), depth_host=True)
    yield A("tanh", torch.tanh, nn.Tanh, (), (F.tanh, torch.Tensor.tanh), ("tanh",), depth_host=True)
    yield A("sigmoid", torch.sigmoid, nn.Sigmoid, (), (F.sigmoid, torch.Tensor.sigmoid), ("sigmoid",))
    yield A("hardswish", F.hardswish, nn.Hardswish, ("inplace",), depth_host=True)
    yield A("hardsigmoid", F.hardsigmoid, nn.Hardsigmoid, ("inplace",))
    yield A("elu", F.elu, nn.ELU, ("alpha", "inplace"), depth_host=True)
    yield A("mish", F.mish, nn.Mish, ("inplace",))
    yield A("selu", F.selu, nn.SELU, ("inplace",))
    yield A("celu", F.celu, nn.CELU, ("alpha", "inplace"))
    yield A("softsign", F.softsign, nn.Softsign)


for _act in builtin():
    register_activation(_act)
