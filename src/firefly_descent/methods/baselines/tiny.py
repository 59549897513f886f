"""TINY (Verbockhaven, Rudkiewicz, Chevallier, Charpiat 2024, "Growing Tiny Networks: Spotting
Expressivity Bottlenecks and Fixing Them Optimally"), written from the paper on this engine.

A group's units live on the path  x --producer--> h --(BatchNorm)--> act --> a --consumer--> z.
With V = -∂ℓ_i/∂z_i the per-sample *desired update* of the consumer's pre-activation:

1. Best update of the existing consumer weights (least squares over samples and positions):
   δW* = S_A⁺ M_A,  S_A = E[A Aᵀ], M_A = E[A Vᵀ]  (A: the consumer's input patch, + 1 for its bias).
   Its first-order loss decrease per unit of step is tr(M_Aᵀ δW*).
2. Expressivity bottleneck: V_proj = V - δW*ᵀA, the part of V no change of the existing consumer weights
   can express. E[A V_projᵀ] = 0 (the projection is orthogonal; tested).
3. New neurons in closed form: with B the producer's input patch (+ 1 for its bias) and, for a k×k
   consumer, B read at every consumer offset,
   S = E[Σ_offsets B Bᵀ],  N = E[Σ_offsets B V_projᵀ]   ([D_in, D_out·k·k]),
   SVD  S^{-1/2} N = Σ λ_k u_k v_kᵀ  →  α_k = √λ_k S^{-1/2} u_k (incoming),  ω_k = √λ_k v_k (outgoing).
   These minimise ‖V_proj - Σ_k ω_k (α_kᵀ B)‖² in the S metric (the generalised eigenproblem of the paper);
   neuron k removes λ_k² of the bottleneck (its "eigenvalue"). For a k×k consumer, cross-offset terms of
   the quadratic form are dropped (S sums B Bᵀ over offsets), as GroMo's FullConv2dGrowingModule does.
4. Amplitude: new incoming weights γ·α, outgoing γ·ω (and, with `update_existing`, existing consumer weights
   + γ²·δW*), so the change of z is γ²·σ'(0)·c·(...) to first order (c: the fresh BatchNorm scale
   1/sqrt(1+eps) of a new channel). γ is chosen per group by a line search of the growth batches' loss
   (GroMo's grid: 0 and log-spaced points from `gamma_min` to 1, extended by decades while it improves),
   group after group in order of expected improvement, each with the groups before it switched on at their
   γ (independent searches can each be fine and together blow the loss up); a group whose best γ is 0 is
   not grown. The loss is computed with hooks on the unchanged model, equal to the engine's grown model.
5. Where to grow: every neuron k of every group competes under the budget with its expected first-order
   improvement σ'(0)·c·λ_k² (GroMo's `first_order_improvement` of the extension).

Normalisation: V = -(batch size)·∂(batch-mean loss)/∂z, i.e. minus each sample's own loss gradient; S, M, N
are means over samples (images, not positions); `first_order` is the decrease of the growth batches'
sample-weighted mean loss per unit of γ²: fo_k = σ'(0)·c·α_kᵀ N_full ω_k with N_full built from V (not V_proj),
so it includes the cross term with the existing weights' best update and can differ from λ_k². It equals the
finite-difference derivative of the grown model's loss for activations with σ(t) = σ'(0)t + O(t³) (tanh,
identity; tested to 1e-4 relative); for ReLU, ReLU(γu) = γ·ReLU(u), so the first-order model is only TINY's
linearisation (it ignores that a ReLU neuron is off on part of the data) and the line search measures the
real loss.

Differences from GroMo 0.1.0 by design (numbers: benchmarks/tiny_vs_gromo.py, λ and first-order values agree
to ~1e-14 relative and the spans of α and ω to ~4e-8 rad on MLPs and a 3×3 conv pair):
- `update_existing` defaults to True: like GroMo's `compute_optimal_updates` (compute_delta=True) the default also
  moves the existing consumer weights by γ²·δW* (its docstring lists compute_delta=False to reproduce the
  paper). Measured on suite B's setup (benchmarks/tiny_growth_step.py, 3 seeds), held-out loss change of one
  step: +0.0145 ± 0.0075 without the update (in-sample -0.0180), -0.0122 ± 0.0089 with it; a baseline should
  not be a straw man, so the default is the peer's. `update_existing=False` isolates the choice of the new
  neurons (every other grower here only adds units). This is the one edit made outside the engine: values
  only, no shapes, on the consumers of the grown groups, just before the plan is applied. Either way the
  new neurons come from the projected V_proj, as GroMo's `tensor_n`. The δW* decrease is reported
  (`extra["delta_decrease"]`) but not used to rank groups.
- GroMo grows one layer per step (the best `first_order_improvement`, which includes the δW* decrease); here
  neurons of all groups compete for the budget (units, parameters or FLOPs) and each chosen group gets its
  own γ (sequential line search, see 4.).
- GroMo averages ∂loss/∂z over samples: with a batch-mean loss its λ is ours / batch size; with a summed loss
  (as in the cross-check) the two are the same number. α, ω, the spans and the ranking do not depend on it.
- S^{-1/2} drops eigenvalues below `rel_threshold` × the largest (GroMo: an absolute 1e-6), and neurons
  with λ_k < `rel_threshold` × λ_max are not candidates (GroMo: an absolute 1e-3).
- `holdout` (default 0, GroMo's in-sample search) can keep the last growth batches out of the statistics to
  choose γ on data the neurons were not fitted to.

Groups handled: a dense or 2-d convolutional producer whose rule says how its input unfolds (Linear,
ungrouped zero-padded Conv2d, a user's layer with such a rule), optional BatchNorm, an activation (module
or functional) with σ(0) = 0, and exactly one such consumer (or a dense consumer reading the flattened
activation map, run as a full-map convolution) whose input *is* the activation output (checked
numerically). Other groups (pooling or other ops between the activation and its consumer, residual-tied
or concatenated producers, depthwise or grouped convolutions, LayerNorm/GroupNorm, several consumers) are
skipped with the reason in
`report.extra["skipped_groups"]` (GrowthError when named in `groups=`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from ...budget import Candidate, select
from ...errors import GrowthError
from ...plan import GroupChange, NewUnits
from ..base import Decision, Timer, as_inputs, mean_loss, register_grower
from ._common import BaselineGrower, Context, slice_shape, unit_costs
from ._probe import Hooks, UnitPath, find_paths, layer_rule, patches, verify_paths
from .gradmax import slope_at_zero


@dataclass
class TinyPath:
    """One group TINY can grow: its unit path and consumer geometry (a Linear on [*, C] is "linear";
    a Conv2d, or a Linear over the flattened [C, H, W] map, is "conv" with kernel/stride/padding/dilation)."""

    path: UnitPath
    consumer: str
    consumer_weight: str
    consumer_bias: bool
    kind: str  # "linear" | "conv"
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    flatten: bool = False  # Linear consumer of the flattened activation map (kernel = the map's size)
    bn_scale: float = 1.0  # fresh BatchNorm scale of a new channel, 1/sqrt(1+eps)
    slope: float = 1.0  # σ'(0⁺)

    @property
    def name(self) -> str:
        return self.path.group.name

    @property
    def k(self) -> int:
        return self.kernel[0] * self.kernel[1]


@dataclass
class TinyGroup:
    """The closed-form TINY solution of one group (float64, on the model's device)."""

    tpath: TinyPath
    alpha: torch.Tensor  # [r, D_in] incoming (weights, then bias)
    omega: torch.Tensor  # [r, D_out * k] outgoing (consumer slice order)
    lambdas: torch.Tensor  # [r] singular values of S^{-1/2} N_proj
    first_order: torch.Tensor  # [r] σ'(0)·c·α_kᵀ N_full ω_k: loss decrease per unit of γ², neuron alone
    delta: torch.Tensor  # [D_out, C*k (+1)] best update δW* of the existing consumer weights (bias last)
    delta_decrease: float  # tr(M_Aᵀ δW*): its first-order loss decrease per unit of γ²
    residual_corr: float  # ‖E[A V_projᵀ]‖ / ‖E[A Vᵀ]‖ (0 up to rounding: the projection is orthogonal)
    n: int = 0  # samples seen
    gamma: float = 0.0
    line: dict[str, Any] = field(default_factory=dict)

    @property
    def improvement(self) -> torch.Tensor:
        """Expected first-order improvement per neuron (GroMo's ranking): σ'(0)·c·λ_k²."""
        return self.tpath.slope * self.tpath.bn_scale * self.lambdas ** 2


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _corr(bmap: torch.Tensor, v: torch.Tensor, tp: TinyPath) -> torch.Tensor:
    """Σ over rows and consumer offsets of B(row ⊕ offset) V(row)ᵀ as [D_in, D_out*k] (ω order (o, offset))."""
    if tp.kind == "linear":
        return bmap.reshape(-1, bmap.shape[1]).transpose(0, 1) @ v.reshape(-1, v.shape[1])
    d_in, d_out = bmap.shape[1], v.shape[1]
    w = nn_grad.conv2d_weight(bmap, (d_out, d_in, *tp.kernel), v, stride=tp.stride, padding=tp.padding,
                              dilation=tp.dilation)  # [D_out, D_in, kh, kw]
    return w.transpose(0, 1).reshape(d_in, d_out * tp.k)


def _offset_weight(shape: tuple[int, int], out: tuple[int, int], tp: TinyPath, like: torch.Tensor) -> torch.Tensor:
    """How many (consumer row, offset) pairs read each position of the activation map, [H, W]."""
    if tp.kind == "linear":
        return torch.ones(1, 1, dtype=like.dtype, device=like.device)
    ones_out = torch.ones(1, 1, *out, dtype=like.dtype, device=like.device)
    ker = torch.ones(1, 1, *tp.kernel, dtype=like.dtype, device=like.device)
    return nn_grad.conv2d_input((1, 1, *shape), ker, ones_out, stride=tp.stride, padding=tp.padding,
                                dilation=tp.dilation)[0, 0]


def _sqrt_inv(S: torch.Tensor, rel: float) -> torch.Tensor:
    S = (S + S.transpose(0, 1)) / 2
    ev, vec = torch.linalg.eigh(S)
    keep = ev > rel * max(float(ev.max()), 0.0) if ev.numel() else ev > 0
    if not bool(keep.any()):
        return torch.zeros_like(S)
    return (vec[:, keep] * ev[keep].rsqrt()) @ vec[:, keep].transpose(0, 1)


@register_grower("tiny")
class TINY(BaselineGrower):
    """TINY: new neurons that best fill the expressivity bottleneck, in closed form (module docstring).

    kwargs: budget=0.35, seed=0, batches=8, groups=None,
    update_existing=True: also add γ²·δW* to the existing consumer weights (GroMo's default; the only edit
      this grower makes outside the engine, value-only, before the plan is applied; False = new units only),
    gamma=None: a fixed amplitude instead of the line search (0 = function-preserving),
    gamma_min=1e-3, points_per_decade=4, max_decades=6: the line search grid,
    rel_threshold=1e-8: relative eigenvalue cut of S and candidate cut of λ,
    holdout=0: the last `holdout` growth batches are left out of the statistics and only choose γ (and are
      what `line_loss` reports); 0 = statistics and line search on the same batches, as GroMo does,
    random_directions=False: ablation: replace α, ω by random directions of the same norms (same count,
      same line search), to measure what the closed form buys,
    stat_dtype=torch.float64: dtype of the statistics.
    """

    name = "tiny"

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        batches: int | None = 8,
        groups: list[str] | None = None,
        per_group: bool = False,
        update_existing: bool = True,
        gamma: float | None = None,
        gamma_min: float = 1e-3,
        points_per_decade: int = 4,
        max_decades: int = 6,
        rel_threshold: float = 1e-8,
        random_directions: bool = False,
        holdout: int = 0,
        stat_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if gamma is not None and gamma < 0:
            raise ValueError(f"gamma must be >= 0, not {gamma}")
        if not 0 < gamma_min < 1:
            raise ValueError(f"gamma_min must be in (0, 1), not {gamma_min}")
        self.update_existing, self.gamma = bool(update_existing), gamma
        self.gamma_min, self.points, self.max_decades = float(gamma_min), int(points_per_decade), int(max_decades)
        self.holdout = int(holdout)
        self.rel_threshold, self.random_directions, self.stat_dtype = float(rel_threshold), bool(
            random_directions), stat_dtype

    # ---- which groups ------------------------------------------------------------------------------
    def paths(self, ctx: Context) -> dict[str, TinyPath]:
        """The groups TINY can grow (reasons for the others go to `ctx.skipped`)."""
        paths, skipped = find_paths(ctx.model, ctx.groups, ctx.x, self.name, depthwise=False)
        skipped.update(verify_paths(ctx.model, paths, ctx.batches[0], self.name))
        ref = next(ctx.model.parameters())
        out: dict[str, TinyPath] = {}
        for n, p in paths.items():
            why, tp = self._consumer(ctx, p, ref)
            if why is None:
                assert tp is not None
                out[n] = tp
            else:
                skipped[n] = f"{self.name} does not apply: {why}"
        if out:
            skipped.update(self._verify_consumers(ctx, out))
            for n in skipped:
                out.pop(n, None)
        if self.group_names is not None and skipped:
            n = next(iter(skipped))
            raise GrowthError(f"group {n!r}: {skipped[n]}")
        ctx.skipped.update(skipped)
        return out

    def _consumer(self, ctx: Context, p: UnitPath, ref: torch.Tensor) -> tuple[str | None, TinyPath | None]:
        model = ctx.model
        s0, slope = slope_at_zero(p.activation, ref)
        if abs(s0) > 1e-12:
            return f"its activation {p.act!r} is not 0 at 0", None
        prod = model.get_submodule(p.producer)
        geo = layer_rule(prod).conv_geometry(prod)
        if geo is not None and len(geo["kernel"]) != 2:
            return "its producer is not a dense layer or a 2-d convolution", None
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
        if len(geo["kernel"]) != 2:
            return f"its consumer is a {len(geo['kernel'])}-d convolution (dense or 2-d needed)", None
        if m.inner != 1 or mod.weight.shape[1] != p.group.width:
            return "its consumer reads other channels besides the group's units", None
        return None, TinyPath(kind="conv", kernel=_pair(geo["kernel"]), stride=_pair(geo["stride"]),
                              padding=_pair(geo["padding"]), dilation=_pair(geo["dilation"]), **common)

    def _verify_consumers(self, ctx: Context, tps: dict[str, TinyPath]) -> dict[str, str]:
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
                    ok = a.dim() == 4 and inp.dim() == 2 and a.shape[0] == inp.shape[0] and a[0].numel() == inp.shape[1]
                    if ok:
                        tp.kernel = (int(a.shape[2]), int(a.shape[3]))
                        a = a.flatten(1)
                else:
                    ok = a.shape == inp.shape and a.dim() == 4
                if not ok or not torch.allclose(a, inp.reshape(a.shape), rtol=1e-5,
                                                atol=1e-6 * (1 + float(a.abs().max()))):
                    why = (f"its consumer {tp.consumer!r} does not read the activation {tp.path.act!r} directly "
                           "(pooling, reshaping or other ops in between)")
                elif tp.flatten and not self._plain_dense(ctx, tp, c["a"]):
                    why = f"its consumer {tp.consumer!r} is not a plain matrix product of the flattened map"
            if why is not None:
                skipped[n] = f"{self.name} does not apply: {why}"
        return skipped

    @staticmethod
    def _plain_dense(ctx: Context, tp: TinyPath, amap: torch.Tensor) -> bool:
        """Whether the consumer's rule runs it on the flattened map as W·a (what the full-map convolution the
        line search uses for it computes), checked with a fixed test weight."""
        cons = ctx.model.get_submodule(tp.consumer)
        w = torch.linspace(-1.0, 1.0, 2 * amap[0].numel(), dtype=amap.dtype, device=amap.device).reshape(2, -1)
        with torch.no_grad():
            dense = layer_rule(cons).run_with(cons, amap.flatten(1), w, None)
            conv = F.conv2d(amap, w.reshape(2, *amap.shape[1:])).flatten(1)
        return dense.shape == conv.shape and torch.allclose(dense, conv, rtol=1e-4,
                                                            atol=1e-5 * (1 + float(conv.abs().max())))

    def _split(self, ctx: Context) -> tuple[list[Any], list[Any]]:
        """(batches for the statistics, batches for the line search): with `holdout` = k > 0 the last k
        growth batches only choose γ; otherwise both are all of them (GroMo's in-sample search)."""
        k = self.holdout
        if k <= 0:
            return ctx.batches, ctx.batches
        if len(ctx.batches) <= k:
            raise GrowthError(f"tiny: holdout={k} needs more than {k} growth batches, got {len(ctx.batches)}; "
                              "raise the growth batches or lower holdout")
        return ctx.batches[:-k], ctx.batches[-k:]

    # ---- statistics ----------------------------------------------------------------------------------
    def _captures(self, ctx: Context, tps: dict[str, TinyPath]) -> Iterator[tuple[int, dict[str, tuple]]]:
        """Per growth batch: its sample count and, per group, the raw (producer input, activation output,
        ∂(batch loss)/∂z at the consumer output, batch size) for `_maps`."""
        for batch in self._split(ctx)[0]:
            yield self._capture(ctx, tps, batch)

    def _capture(self, ctx: Context, tps: dict[str, TinyPath], batch: tuple[Any, Any]) -> tuple[int, dict[str, tuple]]:
        """One batch of `_captures`."""
        modules = dict(ctx.model.named_modules())
        cap: dict[str, dict[str, Any]] = {n: {} for n in tps}
        handles = []

        def cons_hook(n: str) -> Any:
            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
                z = torch.zeros_like(out, requires_grad=True)
                cap[n]["z"] = z
                return out + z
            return hook

        for n, tp in tps.items():
            handles.append(modules[tp.consumer].register_forward_hook(cons_hook(n)))
        was = ctx.model.training
        ctx.model.eval()
        try:
            with torch.enable_grad():
                with Hooks(ctx.model, {n: tp.path for n, tp in tps.items()}, want_a=True, want_z=False) as acts:
                    xb, yb = batch
                    loss = ctx.loss_fn(ctx.model(*as_inputs(xb)), yb)
                names = list(tps)
                grads = torch.autograd.grad(loss, [cap[n]["z"] for n in names], allow_unused=True)
        finally:
            ctx.model.train(was)
            for h in handles:
                h.remove()
        nb = int(yb.shape[0])
        return nb, {n: (acts.cap[n]["x"], acts.cap[n]["a"],
                        torch.zeros_like(cap[n]["z"]) if gz is None else gz.detach(), nb)
                    for n, gz in zip(names, grads)}

    def _maps(self, ctx: Context, tp: TinyPath, raw: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B map [N, D_in, H, W], A map [N, C, H, W], V map [N, D_out, H', W']) of one group and batch in
        `stat_dtype`, built one group at a time (the patch maps are the large tensors)."""
        x, a, g, nb = raw
        dt = self.stat_dtype
        a = a.to(dt)
        X = patches(ctx.model, tp.path, x).to(dt)  # [rows, D_in]
        v = -nb * g.to(dt)
        if tp.kind == "linear":
            return X[:, :, None, None], a.reshape(-1, a.shape[-1])[:, :, None, None], v.reshape(
                -1, v.shape[-1])[:, :, None, None]
        bmap = X.reshape(a.shape[0], a.shape[2], a.shape[3], -1).permute(0, 3, 1, 2)
        return bmap, a, v[:, :, None, None] if tp.flatten else v

    def _consumer_input(self, ctx: Context, amap: torch.Tensor, tp: TinyPath) -> torch.Tensor:
        """The consumer's input rows (its rule's `unfold_input`, bias column last) from the activation map."""
        cons = ctx.model.get_submodule(tp.consumer)
        if tp.kind == "linear":
            amap = amap.reshape(-1, amap.shape[1])
        elif tp.flatten:
            amap = amap.flatten(1)
        return layer_rule(cons).unfold_input(cons, amap)

    def analyse(self, ctx: Context, tps: dict[str, TinyPath]) -> dict[str, TinyGroup]:
        """The closed-form TINY solution of every group in `tps` (two passes over the growth batches)."""
        acc: dict[str, dict[str, Any]] = {n: {} for n in tps}
        n_total = 0
        for nb, caps in self._captures(ctx, tps):
            n_total += nb
            for n, raw in caps.items():
                tp, s = tps[n], acc[n]
                bmap, amap, vmap = self._maps(ctx, tp, raw)
                A = self._consumer_input(ctx, amap, tp)
                V = vmap.movedim(1, -1).reshape(-1, vmap.shape[1])
                w = _offset_weight((bmap.shape[2], bmap.shape[3]), (vmap.shape[2], vmap.shape[3]), tp, bmap)
                Bw = bmap * w
                parts = {
                    "S_A": A.transpose(0, 1) @ A,
                    "M_A": A.transpose(0, 1) @ V,
                    "S_B": torch.einsum("ndhw,nehw->de", Bw, bmap),
                    "N": _corr(bmap, vmap, tp),
                }
                for k, t in parts.items():
                    s[k] = s[k] + t if k in s else t
        out: dict[str, TinyGroup] = {}
        deltas = {}
        for n, s in acc.items():
            S_A, M_A = s["S_A"] / n_total, s["M_A"] / n_total
            delta_t = torch.linalg.pinv(S_A, hermitian=True, rtol=self.rel_threshold) @ M_A  # [C*k(+1), D_out]
            deltas[n] = delta_t
            s["delta_decrease"] = float((M_A * delta_t).sum())
            s["M_A_norm"] = float(M_A.norm())
        # second pass: the projected desired update V_proj = V - δW*ᵀA
        for _, caps in self._captures(ctx, tps):
            for n, raw in caps.items():
                tp, s = tps[n], acc[n]
                bmap, amap, vmap = self._maps(ctx, tp, raw)
                A = self._consumer_input(ctx, amap, tp)
                V = vmap.movedim(1, -1).reshape(-1, vmap.shape[1])
                Vp = V - A @ deltas[n]
                shape = (vmap.shape[0], vmap.shape[2], vmap.shape[3], vmap.shape[1])
                vpmap = Vp.reshape(shape).permute(0, 3, 1, 2)
                parts = {"N_proj": _corr(bmap, vpmap, tp), "R": A.transpose(0, 1) @ Vp}
                for k, t in parts.items():
                    s[k] = s[k] + t if k in s else t
        for n, s in acc.items():
            tp = tps[n]
            S_B, N_full, N_proj = s["S_B"] / n_total, s["N"] / n_total, s["N_proj"] / n_total
            P = _sqrt_inv(S_B, self.rel_threshold)
            U, lam, Vh = torch.linalg.svd(P @ N_proj, full_matrices=False)
            keep = lam > self.rel_threshold * max(float(lam.max()) if lam.numel() else 0.0, 1e-300)
            U, lam, Vh = U[:, keep], lam[keep], Vh[keep]
            idx = Vh.abs().argmax(1)  # sign convention: each ω's largest entry is positive
            sign = torch.sign(Vh.gather(1, idx[:, None]))
            U, Vh = U * sign.transpose(0, 1), Vh * sign
            alpha = (P @ U * lam.sqrt()).transpose(0, 1)  # [r, D_in]
            omega = Vh * lam.sqrt()[:, None]  # [r, D_out*k]
            fo = tp.slope * tp.bn_scale * ((alpha @ N_full) * omega).sum(1)
            out[n] = TinyGroup(tp, alpha, omega, lam, fo, deltas[n].transpose(0, 1).contiguous(),
                               s["delta_decrease"], float((s["R"] / n_total).norm()) / max(s["M_A_norm"], 1e-300),
                               n_total)
        return out

    # ---- the amplitude -----------------------------------------------------------------------------
    def _weights(self, ctx: Context, tg: TinyGroup, ks: list[int], gamma: float) -> dict[str, torch.Tensor]:
        """Producer weight/bias and consumer weight of the new neurons `ks` at amplitude γ (live dtype)."""
        tp, model = tg.tpath, ctx.model
        prod = model.get_submodule(tp.path.producer)
        cons = model.get_submodule(tp.consumer)
        dt = prod.weight.dtype
        a = tg.alpha[ks] * gamma
        nw = int(prod.weight[0].numel())
        out = {"pw": a[:, :nw].reshape(len(ks), *prod.weight.shape[1:]).to(dt)}
        out["pb"] = a[:, nw].to(dt) if tp.path.bias else None
        om = (tg.omega[ks] * gamma).reshape(len(ks), -1, tp.k)  # [r, D_out, k]
        if tp.kind == "linear":
            out["cw"] = om[:, :, 0].transpose(0, 1).to(cons.weight.dtype)  # [D_out, r]
        else:
            out["cw"] = om.transpose(0, 1).reshape(om.shape[1], len(ks), *tp.kernel).to(cons.weight.dtype)
        return out

    def _hooks(self, ctx: Context, tg: TinyGroup, ks: list[int], gamma: float) -> list[Any]:
        """Temporary forward hooks that add neurons `ks` of one group at amplitude γ to the unchanged model
        (and, with `update_existing`, γ²·δW* to its consumer): the model the engine will build."""
        tp = tg.tpath
        w = self._weights(ctx, tg, ks, gamma)
        modules = dict(ctx.model.named_modules())
        prod, act, cons = modules[tp.path.producer], tp.path.activation, modules[tp.consumer]
        prod_rule, cons_rule = layer_rule(prod), layer_rule(cons)
        state: dict[str, torch.Tensor] = {}
        delta = None
        if self.update_existing and gamma > 0:
            d = (tg.delta * gamma ** 2).to(cons.weight.dtype)
            has_b = tp.consumer_bias
            dw = d[:, :-1] if has_b else d
            delta = (dw.reshape(cons.weight.shape), d[:, -1] if has_b else None)

        def prod_hook(_m: nn.Module, inp: tuple[Any, ...], _o: Any) -> None:
            state["a"] = act(prod_rule.run_with(prod, inp[0], w["pw"], w["pb"]) * tp.bn_scale)

        def cons_hook(_m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            a = state.pop("a")
            if tp.flatten:  # a dense consumer of the flattened map: a convolution over the whole map
                extra = F.conv2d(a, w["cw"], None, tp.stride, tp.padding, tp.dilation).reshape(out.shape)
            else:
                extra = cons_rule.run_with(cons, a, w["cw"], None)
            if delta is not None:
                extra = extra + cons_rule.run_with(cons, inp[0], delta[0], delta[1])
            return out + extra

        return [prod.register_forward_hook(prod_hook), cons.register_forward_hook(cons_hook)]

    def virtual_loss(self, ctx: Context, tg: TinyGroup, ks: list[int], gamma: float,
                     fixed: Iterable[tuple[TinyGroup, list[int], float]] = ()) -> float:
        """Growth batches' mean loss with neurons `ks` of `tg` at amplitude γ, plus the already accepted
        groups `fixed` (group, neurons, γ), computed with hooks (tested to equal the engine's grown model)."""
        handles = []
        was = ctx.model.training
        total, count = 0.0, 0
        try:
            for g, k, gm in [*fixed, (tg, ks, gamma)]:
                handles += self._hooks(ctx, g, k, gm)
            ctx.model.eval()
            with torch.no_grad():
                for xb, yb in self._split(ctx)[1]:
                    total += float(ctx.loss_fn(ctx.model(*as_inputs(xb)), yb)) * yb.shape[0]
                    count += int(yb.shape[0])
        finally:
            ctx.model.train(was)
            for h in handles:
                h.remove()
        return total / max(1, count)

    def line_search(self, ctx: Context, tg: TinyGroup, ks: list[int],
                    fixed: Iterable[tuple[TinyGroup, list[int], float]] = ()) -> tuple[float, float]:
        """(γ, loss) minimising the growth batches' loss on 0 ∪ a log grid from `gamma_min`, extended by a
        decade while the best point is the largest one tried (at most `max_decades` extensions)."""
        fixed = list(fixed)
        lo = math.log10(self.gamma_min)
        grid = [0.0] + list(np.logspace(lo, 0.0, max(2, int(round(-lo * self.points)) + 1)))
        tried: dict[float, float] = {}
        for _ in range(self.max_decades + 1):
            for gm in grid:
                if gm not in tried:
                    tried[gm] = self.virtual_loss(ctx, tg, ks, float(gm), fixed)
            best = min(tried, key=lambda g: (tried[g], g))
            top = max(tried)
            if best < top:
                break
            grid = list(np.logspace(math.log10(top), math.log10(top) + 1, self.points + 1))[1:]
        best = min(tried, key=lambda g: (tried[g], g))
        tg.line = {"gammas": sorted(tried), "losses": [tried[g] for g in sorted(tried)]}
        return float(best), tried[best]

    # ---- growth -------------------------------------------------------------------------------------
    def decide(self, ctx: Context) -> Decision:
        """Select neurons under the budget by expected improvement, then set each chosen group's γ by a line
        search with the groups already accepted switched on (best expected improvement first), so the
        amplitudes account for each other; a group whose best γ is 0 is not grown."""
        report = ctx.report
        with Timer(report.timings, "score"):
            tps = self.paths(ctx)
            sol = self.analyse(ctx, tps) if tps else {}
        with Timer(report.timings, "select"):
            costs = unit_costs(ctx, self.budget)
            cands = [Candidate("new", n, k, -float(v), costs[n])
                     for n, tg in sol.items() for k, v in enumerate(tg.improvement.tolist()) if v > 0]
            kept = select(cands, self.budget, ctx.groups)
            chosen: dict[str, list[int]] = {}
            for c in kept:
                chosen.setdefault(c.group, []).append(c.index)
        order = sorted(chosen, key=lambda n: -float(sol[n].improvement[chosen[n]].sum()))
        accepted: list[tuple[TinyGroup, list[int], float]] = []
        extra: dict[str, Any] = {"lambdas": {}, "first_order": {}, "gamma": {}, "line_loss": {}, "delta_decrease": {}}
        with Timer(report.timings, "line_search"):
            for n in order:
                tg, ks = sol[n], sorted(chosen[n])
                if self.random_directions:
                    tg.alpha, tg.omega = self._random_directions(ctx, tg)
                if self.gamma is None:
                    gamma, loss = self.line_search(ctx, tg, ks, accepted)
                    extra["line_loss"][n] = loss
                    if gamma == 0.0:
                        continue  # no amplitude lowers the loss: grow nothing here
                else:
                    gamma = float(self.gamma)
                tg.gamma = gamma
                extra["gamma"][n] = gamma
                accepted.append((tg, ks, gamma))
        if self.gamma is None:
            base = mean_loss(ctx.model, self._split(ctx)[1], ctx.loss_fn) if self.holdout else report.loss_before
            predicted = (extra["line_loss"][accepted[-1][0].tpath.name] - float(base or 0.0) if accepted else 0.0)
            if self.holdout:
                extra["holdout_loss_before"] = base
        else:
            predicted = -sum(gm ** 2 * (float(tg.first_order[ks].sum()) + (tg.delta_decrease if self.update_existing
                                                                           else 0.0)) for tg, ks, gm in accepted)
        changes = []
        for tg, ks, gamma in accepted:
            w = self._weights(ctx, tg, ks, gamma)
            p = tg.tpath
            cons_shape = slice_shape(ctx.model, next(m for m in p.path.group.members if m.role == "consumer"))
            incoming = {p.path.weight: w["pw"].unsqueeze(1).detach().cpu()}
            if p.path.bias:
                incoming[p.path.bias] = w["pb"].reshape(-1, 1).detach().cpu()
            om = (tg.omega[ks] * gamma).to(w["cw"].dtype).reshape(len(ks), *cons_shape)
            changes.append(GroupChange(p.path.group, new=NewUnits(len(ks), incoming=incoming,
                                                                  outgoing={p.consumer_weight: om.detach().cpu()},
                                                                  init="zero")))
        for n, tg in sol.items():
            extra["lambdas"][n] = [float(v) for v in tg.lambdas[:8]]
            extra["first_order"][n] = [float(v) for v in tg.first_order[:8]]
            extra["delta_decrease"][n] = tg.delta_decrease
        finalize = None
        if self.update_existing:  # applied right after the engine adds the units, inside the safeguard's step
            finalize = self._existing_update(ctx, accepted)
        preserving = all(gm == 0.0 for _, _, gm in accepted)
        plan = self.make_plan(ctx, changes, preserving=preserving)
        report.predicted_loss_change = predicted
        report.extra.update(extra)
        report.extra["update_existing"] = self.update_existing
        self.last_solution = sol
        return Decision(plan, finalize=finalize)

    def _random_directions(self, ctx: Context, tg: TinyGroup) -> tuple[torch.Tensor, torch.Tensor]:
        def like(t: torch.Tensor) -> torch.Tensor:
            r = torch.randn(t.shape, generator=ctx.gen, dtype=torch.float64).to(t)
            return r * (t.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-300))
        return like(tg.alpha), like(tg.omega)

    def _existing_update(self, ctx: Context, accepted: list[tuple[TinyGroup, list[int], float]]):
        """A function adding γ²·δW* to the consumer weights of the grown groups once the engine has added the
        units (appended after the old inputs, so the old inputs are the first columns). Run inside the
        safeguard's step, the engine's undo takes it back with the units."""
        edits = []
        for tg, _, gamma in accepted:
            if gamma == 0.0:
                continue
            cons = ctx.model.get_submodule(tg.tpath.consumer)
            edits.append((tg.tpath.consumer, tg.tpath.consumer_bias, list(cons.weight.shape), tg.delta * gamma**2))

        def update() -> None:
            with torch.no_grad():
                for name, has_bias, old_shape, d in edits:
                    cons = ctx.model.get_submodule(name)
                    # the consumer may grow its own outputs in the same plan: old rows and columns come first
                    if has_bias:
                        cons.bias.narrow(0, 0, old_shape[0]).add_(d[:, -1].to(cons.bias.dtype))
                        d = d[:, :-1]
                    old = cons.weight.narrow(0, 0, old_shape[0]).narrow(1, 0, old_shape[1])
                    old.add_(d.reshape(old_shape).to(cons.weight.dtype))

        return update
