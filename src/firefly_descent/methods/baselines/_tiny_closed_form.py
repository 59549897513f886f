"""TINY's statistics and its closed form: the least squares δW* of the existing consumer weights, the
expressivity bottleneck V_proj it leaves, and the SVD that gives the new neurons (steps 1-3 of `tiny.py`).

Kept apart from the grower because it is pure linear algebra over captured tensors: what `benchmarks/
tiny_vs_gromo.py` checks against the peer, independent of how groups are chosen or how γ is searched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import grad as nn_grad

from ..base import as_inputs
from ._common import Context
from ._probe import Hooks, layer_rule, patches
from ._tiny_paths import TinyPath


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


def _corr(bmap: torch.Tensor, v: torch.Tensor, tp: TinyPath) -> torch.Tensor:
    """Σ over rows and consumer offsets of B(row ⊕ offset) V(row)ᵀ as [D_in, D_out*k] (ω order (o, offset))."""
    if tp.kind == "linear":
        return bmap.reshape(-1, bmap.shape[1]).transpose(0, 1) @ v.reshape(-1, v.shape[1])
    d_in, d_out = bmap.shape[1], v.shape[1]
    conv_weight = (nn_grad.conv1d_weight, nn_grad.conv2d_weight, nn_grad.conv3d_weight)[len(tp.kernel) - 1]
    w = conv_weight(bmap, (d_out, d_in, *tp.kernel), v, stride=tp.stride, padding=tp.padding,
                    dilation=tp.dilation)  # [D_out, D_in, *kernel]
    return w.transpose(0, 1).reshape(d_in, d_out * tp.k)


def _offset_weight(shape: tuple[int, int], out: tuple[int, int], tp: TinyPath, like: torch.Tensor) -> torch.Tensor:
    """How many (consumer row, offset) pairs read each position of the activation map, [H, W]."""
    if tp.kind == "linear":
        return torch.ones(1, 1, dtype=like.dtype, device=like.device)
    ones_out = torch.ones(1, 1, *out, dtype=like.dtype, device=like.device)
    ker = torch.ones(1, 1, *tp.kernel, dtype=like.dtype, device=like.device)
    conv_input = (nn_grad.conv1d_input, nn_grad.conv2d_input, nn_grad.conv3d_input)[len(tp.kernel) - 1]
    return conv_input((1, 1, *shape), ker, ones_out, stride=tp.stride, padding=tp.padding,
                      dilation=tp.dilation)[0, 0]


def _sqrt_inv(S: torch.Tensor, rel: float) -> torch.Tensor:
    """S^{-1/2} on the eigenvectors of S above `rel` × its largest eigenvalue, 0 on the others (S may be
    singular: constant or duplicated inputs)."""
    S = (S + S.transpose(0, 1)) / 2
    ev, vec = torch.linalg.eigh(S)
    keep = ev > rel * max(float(ev.max()), 0.0) if ev.numel() else ev > 0
    if not bool(keep.any()):
        return torch.zeros_like(S)
    return (vec[:, keep] * ev[keep].rsqrt()) @ vec[:, keep].transpose(0, 1)


def _captures(ctx: Context, tps: dict[str, TinyPath], batches: list[Any]) -> Iterator[tuple[int, dict[str, tuple]]]:
    """Per growth batch: its sample count and, per group, the raw (producer input, activation output,
    ∂(batch loss)/∂z at the consumer output, batch size) for `_maps`."""
    for batch in batches:
        yield _capture(ctx, tps, batch)


def _capture(ctx: Context, tps: dict[str, TinyPath], batch: tuple[Any, Any]) -> tuple[int, dict[str, tuple]]:
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


def _maps(ctx: Context, tp: TinyPath, raw: tuple, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B map [N, D_in, H, W], A map [N, C, H, W], V map [N, D_out, H', W']) of one group and batch in
    dtype `dt`, built one group at a time (the patch maps are the large tensors)."""
    x, a, g, nb = raw
    a = a.to(dt)
    X = patches(ctx.model, tp.path, x).to(dt)  # [rows, D_in]
    v = -nb * g.to(dt)
    if tp.kind == "linear":
        return X[:, :, None], a.reshape(-1, a.shape[-1])[:, :, None], v.reshape(-1, v.shape[-1])[:, :, None]
    bmap = X.reshape(a.shape[0], *a.shape[2:], -1).movedim(-1, 1)
    return bmap, a, v.reshape(*v.shape[:2], *([1] * (a.dim() - 2))) if tp.flatten else v


def _consumer_input(ctx: Context, amap: torch.Tensor, tp: TinyPath) -> torch.Tensor:
    """The consumer's input rows (its rule's `unfold_input`, bias column last) from the activation map."""
    cons = ctx.model.get_submodule(tp.consumer)
    if tp.kind == "linear":
        amap = amap.reshape(-1, amap.shape[1])
    elif tp.flatten:
        amap = amap.flatten(1)
    return layer_rule(cons).unfold_input(cons, amap)


def closed_form(ctx: Context, tps: dict[str, TinyPath], batches: list[Any], stat_dtype: torch.dtype,
                rel_threshold: float) -> dict[str, TinyGroup]:
    """The closed-form TINY solution of every group in `tps` from `batches` (two passes: δW* needs the
    first pass's sums before V_proj can be formed), statistics in `stat_dtype`, `rel_threshold` the
    relative cut of S's eigenvalues and of λ."""
    acc: dict[str, dict[str, Any]] = {n: {} for n in tps}
    n_total = 0
    for nb, caps in _captures(ctx, tps, batches):
        n_total += nb
        for n, raw in caps.items():
            tp, s = tps[n], acc[n]
            bmap, amap, vmap = _maps(ctx, tp, raw, stat_dtype)
            A = _consumer_input(ctx, amap, tp)
            V = vmap.movedim(1, -1).reshape(-1, vmap.shape[1])
            w = _offset_weight(tuple(bmap.shape[2:]), tuple(vmap.shape[2:]), tp, bmap)
            Bw = bmap * w
            parts = {
                "S_A": A.transpose(0, 1) @ A,
                "M_A": A.transpose(0, 1) @ V,
                "S_B": torch.einsum("nd...,ne...->de", Bw, bmap),
                "N": _corr(bmap, vmap, tp),
            }
            for k, t in parts.items():
                s[k] = s[k] + t if k in s else t
    out: dict[str, TinyGroup] = {}
    deltas = {}
    for n, s in acc.items():
        S_A, M_A = s["S_A"] / n_total, s["M_A"] / n_total
        delta_t = torch.linalg.pinv(S_A, hermitian=True, rtol=rel_threshold) @ M_A  # [C*k(+1), D_out]
        deltas[n] = delta_t
        s["delta_decrease"] = float((M_A * delta_t).sum())
        s["M_A_norm"] = float(M_A.norm())
    # second pass: the projected desired update V_proj = V - δW*ᵀA
    for _, caps in _captures(ctx, tps, batches):
        for n, raw in caps.items():
            tp, s = tps[n], acc[n]
            bmap, amap, vmap = _maps(ctx, tp, raw, stat_dtype)
            A = _consumer_input(ctx, amap, tp)
            V = vmap.movedim(1, -1).reshape(-1, vmap.shape[1])
            Vp = V - A @ deltas[n]
            vpmap = Vp.reshape(vmap.shape[0], *vmap.shape[2:], vmap.shape[1]).movedim(-1, 1)
            parts = {"N_proj": _corr(bmap, vpmap, tp), "R": A.transpose(0, 1) @ Vp}
            for k, t in parts.items():
                s[k] = s[k] + t if k in s else t
    for n, s in acc.items():
        tp = tps[n]
        S_B, N_full, N_proj = s["S_B"] / n_total, s["N"] / n_total, s["N_proj"] / n_total
        P = _sqrt_inv(S_B, rel_threshold)
        U, lam, Vh = torch.linalg.svd(P @ N_proj, full_matrices=False)
        keep = lam > rel_threshold * max(float(lam.max()) if lam.numel() else 0.0, 1e-300)
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
