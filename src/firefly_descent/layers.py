"""Standard layers the engine inserts when it grows a model deeper.

They are ordinary `nn.Module`s (no hooks or parametrisations), so grown models keep working with
`state_dict`, `torch.compile`, `torch.export` and ONNX.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .analysis.activations import activation_module
from .analysis.graph import Member
from .analysis.rules import LayerRule, register_rule


class Residual(nn.Module):
    """z -> z + scale * body(z); exactly the identity when scale = 0."""

    def __init__(self, body: nn.Module, scale: float = 0.0) -> None:
        super().__init__()
        self.body = body
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.scale * self.body(z)


class ResidualRule(LayerRule):
    """`Residual` is traced into (its body's layers carry the rules); growth methods read `residual`: the
    layers inside it were inserted by growth (their square weights may widen with the stage)."""

    leaf = False
    residual = True


register_rule(Residual, ResidualRule())


BLOCK_COPY_ATTR = "_firefly_block_copy"  # set on a block the engine inserted as a copy of the block it follows


def is_kv_cache(value: Any) -> bool:
    """A key/value cache object (Hugging Face's `Cache`): it holds one layer's past keys per layer index."""
    kind = type(value)  # asked of the type: a traced value (an fx Proxy) answers any attribute
    return not isinstance(value, torch.Tensor) and hasattr(kind, "get_seq_length") and hasattr(kind, "update")


def _layer_index(block: nn.Module) -> int:
    """The cache slot the block's attention writes (`layer_idx`), 0 when it has none."""
    return next((int(m.layer_idx) for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), 0)


class Then(nn.Sequential):
    """A module followed by inserted layers: the first gets every argument (a DARTS cell reads two
    inputs), the rest are chained. Same parameter names as `nn.Sequential`.

    A new block copied from the first (`BLOCK_COPY_ATTR`) is called as the first was: the chained hidden
    states, then the same other arguments (a decoder's causal mask, rotary position embeddings), so it is
    causal where its source is. It gets no key/value cache: the cache has one slot per original layer, and
    the copy's attention would write into its source's. A forward that has to read past keys (incremental
    decoding with a cache) is refused with a one-line error instead of silently attending to nothing."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        copies = any(getattr(m, BLOCK_COPY_ATTR, False) for m in list(self)[1:])
        if copies:
            self._refuse_decoding(args, kwargs)
        out = self[0](*args, **kwargs)
        for m in list(self)[1:]:
            if getattr(m, BLOCK_COPY_ATTR, False):
                rest = tuple(None if is_kv_cache(a) else a for a in args[1:])
                kw = {k: (None if is_kv_cache(v) else v) for k, v in kwargs.items()}
                out = m(out[0] if isinstance(out, tuple) else out, *rest, **kw)
            else:
                out = m(out)
        return out

    def _refuse_decoding(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from .errors import GrowthError

        for value in (*args[1:], *kwargs.values()):
            if is_kv_cache(value):
                try:
                    past = int(value.get_seq_length(_layer_index(self[0])))
                except Exception:  # noqa: BLE001 - a cache that cannot say holds nothing we rely on
                    past = 0
                if past > 0:
                    raise GrowthError(
                        "a block inserted by growth (a copy of the block before it) cannot decode from a key/value "
                        "cache: run the model without one (generate(..., use_cache=False))"
                    )

    def __getattr__(self, name: str) -> Any:
        """Public data attributes and submodules of the first (followed) module stay reachable through
        `Then`, because a parent's forward may read them (`nn.TransformerEncoder` reads
        `self.layers[0].self_attn`). Only names `nn.Module` cannot resolve fall through; private and
        dunder names (copy/pickle protocols, hooks, parametrizations), child indices and methods never do,
        so `Then` is not mistaken for the module it wraps (e.g. a second `reset_parameters`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent while unpickling: never recurse
            public = name.isidentifier() and not name.startswith("_")  # never "1": add_module's own check
            first = modules.get("0") if modules and public else None
            if first is None:
                raise
            value = getattr(first, name)
            if inspect.ismethod(value):
                raise
            return value


class ScaledBranch(nn.Module):
    """x -> scale * body(x): a new branch added into a sum (exactly zero when scale = 0)."""

    def __init__(self, body: nn.Module, scale: float = 0.0) -> None:
        super().__init__()
        self.body = body
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.body(x)


_BODIES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}
_MEMBERS: dict[str, Callable[[dict[str, Any], str], list[Any]]] = {}


def register_body(
    kind: str,
    builder: Callable[[dict[str, Any]], nn.Module],
    members: Callable[[dict[str, Any], str], list[Any]] | None = None,
) -> None:
    """Let plans build bodies of type `kind` (new layers or new branches) from a plain-data spec.

    `members(spec, prefix)` lists the body's tensors that follow the channel group it reads and writes
    (see `body_members`), so a kept new block can be widened with the group it sits on."""
    _BODIES[kind] = builder
    if members is not None:
        _MEMBERS[kind] = members


def body_members(spec: dict[str, Any], prefix: str = "") -> list[Any]:
    """The (tensor, dim, role) members of a body built from `spec` that follow its channel group:
    its output units are tied to the boundary's group (residual add) and it reads that group."""

    kind = spec.get("type")
    if kind in _MEMBERS:
        return _MEMBERS[kind](spec, prefix)
    if kind in ("conv_bn_act",):
        return [
            Member(f"{prefix}0.weight", 0, "producer", "weight", f"{prefix}0"),
            Member(f"{prefix}0.weight", 1, "consumer", "weight", f"{prefix}0"),
            Member(f"{prefix}1.weight", 0, "norm", "norm_weight", f"{prefix}1"),
            Member(f"{prefix}1.bias", 0, "norm", "norm_bias", f"{prefix}1"),
            Member(f"{prefix}1.running_mean", 0, "norm", "running_mean", f"{prefix}1"),
            Member(f"{prefix}1.running_var", 0, "norm", "running_var", f"{prefix}1"),
        ]
    if kind in ("linear_act", "conv_identity", "linear_identity"):
        return [
            Member(f"{prefix}0.weight", 0, "producer", "weight", f"{prefix}0"),
            Member(f"{prefix}0.bias", 0, "producer", "bias", f"{prefix}0"),
            Member(f"{prefix}0.weight", 1, "consumer", "weight", f"{prefix}0"),
        ]
    raise ValueError(f"unknown new-layer type {kind!r}")


def build_body(spec: dict[str, Any]) -> nn.Module:
    """A fresh block of standard layers from a plain-data spec.

    conv_bn_act:   {"channels": C, "dims": 1|2, "kernel_size": 3, "act": "relu"}   (channels on dim 1)
    linear_act:    {"features": C, "act": "relu"}                                 (features on the last dim)
    conv_identity / linear_identity: identity-initialised conv/linear + ReLU (Net2Net deepening)
    """
    kind = spec.get("type")
    if kind in _BODIES:
        return _BODIES[kind](spec)
    act = activation_module(spec.get("act", "relu"))  # any registered activation's short name, or "identity"
    if kind in ("conv_bn_act", "conv_identity"):
        c, k, dims = int(spec["channels"]), int(spec.get("kernel_size", 3)), int(spec.get("dims", 2))
        conv_t = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn_t = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        if kind == "conv_bn_act":
            return nn.Sequential(conv_t(c, c, k, padding=k // 2, bias=False), bn_t(c), act())
        conv = conv_t(c, c, k, padding=k // 2, bias=True)
        with torch.no_grad():
            nn.init.dirac_(conv.weight)
            conv.bias.zero_()
        return nn.Sequential(conv, nn.ReLU())
    if kind in ("linear_act", "linear_identity"):
        f = int(spec["features"])
        lin = nn.Linear(f, f)
        if kind == "linear_act":
            return nn.Sequential(lin, act())
        with torch.no_grad():
            lin.weight.copy_(torch.eye(f))
            lin.bias.zero_()
        return nn.Sequential(lin, nn.ReLU())
    raise ValueError(
        f"unknown new-layer type {kind!r}; use conv_bn_act, linear_act, conv_identity, linear_identity"
        f"{''.join(', ' + k for k in sorted(_BODIES))}"
    )


# ---- blocks of a model's own kind, inserted as residual depth candidates (z + scale * body(z)) ----------


def _bn_members(name: str) -> list[Any]:

    kinds = ("weight", "norm_weight"), ("bias", "norm_bias"), ("running_mean", "running_mean")
    out = [Member(f"{name}.{t}", 0, "norm", k, name) for t, k in kinds]
    return out + [Member(f"{name}.running_var", 0, "norm", "running_var", name)]


def _dwsep_body(spec: dict[str, Any]) -> nn.Module:
    """A stride-1 depthwise-separable block (MobileNetV1): 3x3 depthwise-BN-ReLU, 1x1 pointwise-BN-ReLU."""

    c, k = int(spec["channels"]), int(spec.get("kernel_size", 3))
    return nn.Sequential(
        OrderedDict(
            dw_conv=nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False),
            dw_bn=nn.BatchNorm2d(c),
            dw_relu=nn.ReLU(),
            pw_conv=nn.Conv2d(c, c, 1, bias=False),
            pw_bn=nn.BatchNorm2d(c),
            pw_relu=nn.ReLU(),
        )
    )


def _dwsep_members(spec: dict[str, Any], prefix: str) -> list[Any]:

    return [
        Member(f"{prefix}dw_conv.weight", 0, "passthrough", "weight", f"{prefix}dw_conv"),
        *_bn_members(f"{prefix}dw_bn"),
        Member(f"{prefix}pw_conv.weight", 0, "producer", "weight", f"{prefix}pw_conv"),
        Member(f"{prefix}pw_conv.weight", 1, "consumer", "weight", f"{prefix}pw_conv"),
        *_bn_members(f"{prefix}pw_bn"),
    ]


def _basic_block_body(spec: dict[str, Any]) -> nn.Module:
    """A ResNet basic block's residual branch: conv-BN-ReLU-conv-BN; its hidden width may be smaller
    than the channels it reads and writes (`hidden`, default the same)."""

    c = int(spec["channels"])
    h, k = int(spec.get("hidden", c)), int(spec.get("kernel_size", 3))
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c, h, k, padding=k // 2, bias=False),
            bn1=nn.BatchNorm2d(h),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(h, c, k, padding=k // 2, bias=False),
            bn2=nn.BatchNorm2d(c),
        )
    )


def _basic_block_members(spec: dict[str, Any], prefix: str) -> list[Any]:

    return [
        Member(f"{prefix}conv1.weight", 1, "consumer", "weight", f"{prefix}conv1"),
        Member(f"{prefix}conv2.weight", 0, "producer", "weight", f"{prefix}conv2"),
        *_bn_members(f"{prefix}bn2"),
    ]


register_body("dwsep", _dwsep_body, _dwsep_members)
register_body("basic_block", _basic_block_body, _basic_block_members)
