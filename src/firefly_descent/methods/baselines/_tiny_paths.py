"""Which groups TINY can grow, and the consumer geometry its closed form needs (see `tiny.py`).

TINY's statistics assume one path  x --producer--> h --(BatchNorm)--> act --> a --consumer--> z  with σ(0) = 0 and
a consumer that reads `a` itself; anything else (pooling in between, several consumers, grouped convolutions,
concatenations) would give wrong numbers, not an error, so it is checked here, first from the layer rules and
then numerically on one batch, and the group is skipped with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import GrowthError
from ..base import as_inputs
from ._common import Context
from ._probe import Hooks, UnitPath, find_paths, layer_rule, verify_paths
from .gradmax import slope_at_zero


@dataclass
class TinyPath:
    """One group TINY can grow: its unit path and consumer geometry (a Linear on [*, C] is "linear";
    a Conv1d/2d/3d, or a Linear over the flattened [C, *spatial] map, is "conv" with kernel/stride/padding/
    dilation, one entry per spatial dim)."""

    path: UnitPath
    consumer: str
    consumer_weight: str
    consumer_bias: bool
    kind: str  # "linear" | "conv"
    kernel: tuple[int, ...] = (1,)
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    flatten: bool = False  # Linear consumer of the flattened activation map (kernel = the map's size)
    bn_scale: float = 1.0  # fresh BatchNorm scale of a new channel, 1/sqrt(1+eps)
    slope: float = 1.0  # σ'(0⁺)
    spatial: int = 1  # spatial dims of the activation map ([N, C, *spatial]); a linear path has one of size 1

    @property
    def name(self) -> str:
        return self.path.group.name

    @property
    def k(self) -> int:
        return math.prod(self.kernel)


def conv_nd(n: int) -> Callable[..., torch.Tensor]:
    """F.conv1d, F.conv2d or F.conv3d for `n` spatial dims."""
    return (F.conv1d, F.conv2d, F.conv3d)[n - 1]


def _geometry(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def tiny_paths(ctx: Context, name: str, group_names: list[str] | None) -> dict[str, TinyPath]:
    """The groups TINY can grow (reasons for the others go to `ctx.skipped`; GrowthError when one of
    `group_names`, the groups the user named, cannot be grown). `name` is the grower's, for the messages."""
    paths, skipped = find_paths(ctx.model, ctx.groups, ctx.x, name, depthwise=False)
    skipped.update(verify_paths(ctx.model, paths, ctx.batches[0], name))
    ref = next(ctx.model.parameters())
    out: dict[str, TinyPath] = {}
    for n, p in paths.items():
        why, tp = _tiny_path(ctx, p, ref)
        if why is None:
            assert tp is not None
            out[n] = tp
        else:
            skipped[n] = f"{name} does not apply: {why}"
    if out:
        skipped.update(_verify_consumers(ctx, out, name))
        for n in skipped:
            out.pop(n, None)
    if group_names is not None and skipped:
        n = next(iter(skipped))
        raise GrowthError(f"group {n!r}: {skipped[n]}")
    ctx.skipped.update(skipped)
    return out


def _tiny_path(ctx: Context, p: UnitPath, ref: torch.Tensor) -> tuple[str | None, TinyPath | None]:
    """(None, the group's TinyPath) when its activation, producer and single consumer fit TINY's closed form,
    else (why not, None); read from the layer rules, before any data is run."""
    model = ctx.model
    s0, slope = slope_at_zero(p.activation, ref)
    if abs(s0) > 1e-12:
        return f"its activation {p.act!r} is not 0 at 0", None
    prod = model.get_submodule(p.producer)
    geo = layer_rule(prod).conv_geometry(prod)
    if geo is not None and len(geo["kernel"]) not in (1, 2, 3):
        return "its producer is not a dense layer or a 1-d, 2-d or 3-d convolution", None
    cons = [m for m in p.group.members if m.role == "consumer"]
    if len(cons) != 1 or cons[0].kind != "weight":
        return f"it has {len(cons)} consumer tensors (one consumer weight needed)", None
    m = cons[0]
    mod = model.get_submodule(m.module)
    bn = 1.0
    if p.norm is not None:
        bn = 1.0 / math.sqrt(1.0 + float(model.get_submodule(p.norm).eps))
    common = dict(path=p, consumer=m.module, consumer_weight=m.tensor, consumer_bias=getattr(mod, "bias", None)
                  is not None, bn_scale=bn, slope=slope)
    if m.offset != 0 or m.dim != 1:
        return "its units are a part of the consumer's input (concatenation)", None
    rule = layer_rule(mod)
    why = rule.unfold_reason(mod)
    if why is not None or rule.per_channel(mod):
        return f"its consumer {why or 'is a grouped convolution'}", None
    geo = rule.conv_geometry(mod)
    if geo is None:  # dense: its weight [out, in] reads the last dim
        if m.inner * p.group.width != mod.weight.shape[1]:
            return "its consumer reads other features besides the group's units", None
        if m.inner == 1:
            return None, TinyPath(kind="linear", **common)
        return None, TinyPath(kind="conv", flatten=True, **common)  # kernel set from the map in verify
    n = len(geo["kernel"])
    if n not in (1, 2, 3):
        return f"its consumer is a {n}-d convolution (dense or 1-d to 3-d needed)", None
    if m.inner != 1 or mod.weight.shape[1] != p.group.width:
        return "its consumer reads other channels besides the group's units", None
    return None, TinyPath(kind="conv", kernel=_geometry(geo["kernel"], n), stride=_geometry(geo["stride"], n),
                          padding=_geometry(geo["padding"], n), dilation=_geometry(geo["dilation"], n),
                          spatial=n, **common)


def _verify_consumers(ctx: Context, tps: dict[str, TinyPath], name: str) -> dict[str, str]:
    """Skip groups whose consumer does not read the activation output itself (pooling, ops in between)."""
    cap: dict[str, dict[str, torch.Tensor]] = {n: {} for n in tps}
    handles = []
    modules = dict(ctx.model.named_modules())

    def cons_hook(n: str) -> Any:
        def hook(_m: nn.Module, inp: tuple[Any, ...], _o: Any) -> None:
            cap[n]["in"] = inp[0].detach().clone()
            cap[n]["count"] = cap[n].get("count", torch.zeros(())) + 1
        return hook

    for n, tp in tps.items():
        handles.append(modules[tp.consumer].register_forward_hook(cons_hook(n)))
    was = ctx.model.training
    try:
        ctx.model.eval()
        with torch.no_grad(), Hooks(ctx.model, {n: tp.path for n, tp in tps.items()}, want_a=True,
                                    want_z=False) as acts:
            ctx.model(*as_inputs(ctx.batches[0][0]))
    finally:
        ctx.model.train(was)
        for h in handles:
            h.remove()
    skipped = {}
    for n, tp in tps.items():
        c = cap[n]
        if "a" in acts.cap[n]:
            c["a"] = acts.cap[n]["a"]
        why = None
        if "a" not in c or "in" not in c:
            why = "its activation or consumer did not run"
        elif int(c["count"]) != 1:
            why = "its consumer runs more than once per forward"
        else:
            a, inp = c["a"], c["in"]
            if tp.kind == "linear":
                ok = a.shape == inp.shape
            elif tp.flatten:
                ok = a.dim() in (3, 4, 5) and inp.dim() == 2 and a.shape[0] == inp.shape[0] and \
                    a[0].numel() == inp.shape[1]
                if ok:  # a full-map convolution: kernel = the map, one output position
                    tp.spatial = a.dim() - 2
                    tp.kernel = tuple(int(d) for d in a.shape[2:])
                    tp.stride, tp.padding, tp.dilation = (1,) * tp.spatial, (0,) * tp.spatial, (1,) * tp.spatial
                    a = a.flatten(1)
            else:
                ok = a.shape == inp.shape and a.dim() == 2 + tp.spatial
            if not ok or not torch.allclose(a, inp.reshape(a.shape), rtol=1e-5,
                                            atol=1e-6 * (1 + float(a.abs().max()))):
                why = (f"its consumer {tp.consumer!r} does not read the activation {tp.path.act!r} directly "
                       "(pooling, reshaping or other ops in between)")
            elif tp.flatten and not _plain_dense(ctx, tp, c["a"]):
                why = f"its consumer {tp.consumer!r} is not a plain matrix product of the flattened map"
        if why is not None:
            skipped[n] = f"{name} does not apply: {why}"
    return skipped


def _plain_dense(ctx: Context, tp: TinyPath, amap: torch.Tensor) -> bool:
    """Whether the consumer's rule runs it on the flattened map as W·a (what the full-map convolution the
    line search uses for it computes), checked with a fixed test weight."""
    cons = ctx.model.get_submodule(tp.consumer)
    w = torch.linspace(-1.0, 1.0, 2 * amap[0].numel(), dtype=amap.dtype, device=amap.device).reshape(2, -1)
    with torch.no_grad():
        dense = layer_rule(cons).run_with(cons, amap.flatten(1), w, None)
        conv = conv_nd(amap.dim() - 2)(amap, w.reshape(2, *amap.shape[1:])).flatten(1)
    return dense.shape == conv.shape and torch.allclose(dense, conv, rtol=1e-4,
                                                        atol=1e-5 * (1 + float(conv.abs().max())))
