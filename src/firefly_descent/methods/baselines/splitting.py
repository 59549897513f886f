"""Splitting steepest descent (Liu, Wu, Wang 2019) and its fast / energy-aware variant (Wang et al. 2019).

Derivation (what the code computes). Unit i: y_i = c_i·θ_iᵀx + d_i (eval-mode BatchNorm folded into
c_i, d_i; c = 1, d = 0 without BN), a_i = σ(y_i). Splitting i into θ_i ± εv with the outgoing
weights halved (the engine's split; the twin copies the BN channel) feeds the consumers
½σ(y_i + εc_i vᵀx) + ½σ(y_i − εc_i vᵀx) = a_i + ½ε²c_i²σ''(y_i)(vᵀx)² + O(ε⁴).
The first-order terms cancel, so the product term of the downstream Hessian vanishes and
  d²L/dε² |_{ε=0} = vᵀ S_i v,   S_i = E[ Σ_positions ∂L/∂a_i · σ''(y_i) · c_i² · x xᵀ ],
i.e. L(split) ≈ L + ½ε² vᵀS_i v: the best direction is the eigenvector of S_i's minimum eigenvalue
λ_i, and splitting helps only when λ_i < 0 (predicted change ½ε²λ_i). E is the mean over the
growth batches of the batch-mean loss; x is the producer's input patch (conv: per output
position, sums over positions) with a 1 appended for a bias. In groups that pass through a depthwise
conv (MobileNet) the unit is the depthwise neuron (θ_i its k×k filter, x the patch of its own
channel): the layer before it is copied exactly, so the pair still meets only in the halved consumer.
For ReLU-like activations σ'' is replaced by the second derivative of softplus(β=3) as in the
authors' code (ReLU6 / Hardtanh: the difference of two such terms at the two kinks; LeakyReLU:
scaled by 1 − slope); smooth
activations use their exact σ'' (autograd). BatchNorm is taken in eval mode (frozen statistics):
that is what makes it the per-unit affine map above.

`splitting-exact` forms S_i (D×D, D = fan-in) and calls `torch.linalg.eigh`, units in chunks that
fit `memory_limit`; `splitting-fast` never forms S_i: it minimises the Rayleigh quotient
vᵀS_i v / vᵀv for all units at once by locally optimal block gradient descent (LOBPCG without
preconditioner: Rayleigh-Ritz on span{v, residual S v − ρv, previous step}), using only the
products S_i v = E[∂L/∂a_i σ''(y_i) c_i² x (xᵀv)].
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ...analysis.activations import ActivationCall, softplus_d2
from ...budget import Budget, Candidate, group_unit_costs, select
from ...collective import current_sync
from ...errors import GrowthError
from ...plan import GroupChange, Plan, Split
from ..base import LossFn, Timer, register_grower
from ._common import BaselineGrower, Context, unit_costs
from ._probe import UnitData, UnitPath, collect, find_paths, verify_paths

__all__ = ["SplittingExact", "SplittingFast", "exact_eigs", "fast_eigs", "second_derivative", "softplus_d2"]

Eigs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # group -> (min eigenvalue [C], unit eigenvector [C, D])


def second_derivative(act: ActivationCall, y: torch.Tensor, beta: float = 3.0) -> torch.Tensor:
    """σ''(y) of an activation call: exact when smooth, the softplus(β) surrogate at ReLU-like kinks (the
    activation registry's `kink_d2`)."""
    return act.second_derivative(y, beta)


def unit_weights(model: nn.Module, path: UnitPath, d: UnitData, beta: float) -> torch.Tensor:
    """w[n, i] = ∂L/∂a_i · σ''(y_i) · c_i² per position: S_i = Σ_n w[n, i] x_n x_nᵀ."""
    return d.g * second_derivative(path.activation, d.y, beta) * d.c.pow(2)


def _position_chunk(n: int, per_row: int, limit: int) -> int:
    return max(1, min(n, limit // max(1, per_row)))


def exact_eigs(
    model: nn.Module,
    paths: dict[str, UnitPath],
    batches: list[tuple[Any, Any]],
    loss_fn: LossFn,
    memory_limit: int = 1 << 30,
    beta: float = 3.0,
    return_matrices: bool = False,
) -> tuple[Eigs, dict[str, torch.Tensor]]:
    """Minimum eigenpair of every unit's splitting matrix, forming S_i in chunks of units.

    A chunk holds k matrices of D×D; k shrinks so that k·D²·(itemsize + 8) ≤ `memory_limit` (the
    matrices are decomposed in float64, where LAPACK converges reliably); a group
    whose single matrix exceeds the limit raises GrowthError. Each chunk round re-reads the batches
    (one forward/backward per batch), so memory never holds more than one chunk per group.
    """
    itemsize = next(model.parameters()).element_size()
    plan: dict[str, tuple[int, int, int]] = {}  # group -> (C, D, chunk)
    for n, p in paths.items():
        D, C = p.dim(model), p.group.width
        one = D * D * (itemsize + 8)  # accumulated in the model's dtype, decomposed in float64
        if one > memory_limit:
            raise GrowthError(
                f"splitting-exact: group {n!r} has fan-in D={D}; one {D}x{D} splitting matrix needs "
                f"{one:,} bytes > memory_limit {memory_limit:,}; raise memory_limit or use splitting-fast"
            )
        plan[n] = (C, D, max(1, min(C, memory_limit // one)))
    rounds = max((math.ceil(C / k) for C, _, k in plan.values()), default=0)
    samples = sum(len(y) for _, y in batches)
    vals: dict[str, list[torch.Tensor]] = {n: [] for n in paths}
    vecs: dict[str, list[torch.Tensor]] = {n: [] for n in paths}
    mats: dict[str, list[torch.Tensor]] = {n: [] for n in paths}
    for r in range(rounds):
        todo = {n: (r * k, min(C, (r + 1) * k)) for n, (C, _, k) in plan.items() if r * k < C}
        S: dict[str, torch.Tensor] = {}
        for stats in collect(model, {n: paths[n] for n in todo}, batches, loss_fn):
            for n, (u0, u1) in todo.items():
                d = stats[n]
                w = unit_weights(model, paths[n], d, beta)[:, u0:u1]
                X = d.X
                D, k = X.shape[-1], u1 - u0
                acc = S.get(n)
                if acc is None:
                    acc = S[n] = torch.zeros(k, D, D, dtype=X.dtype, device=X.device)
                D = X.shape[-1]
                m = _position_chunk(X.shape[0], k * D * itemsize, memory_limit)
                for p0 in range(0, X.shape[0], m):
                    if X.dim() == 2:  # every unit sees the same patch
                        Xc = X[p0:p0 + m]
                        acc += torch.einsum("mkd,me->kde", Xc[:, None, :] * w[p0:p0 + m, :, None], Xc)
                    else:  # depthwise: unit c sees its own channel's patch
                        Xc = X[p0:p0 + m, u0:u1]
                        acc += torch.einsum("mkd,mke->kde", Xc * w[p0:p0 + m, :, None], Xc)
        for n, acc in S.items():
            acc = current_sync().mean(acc / len(batches), samples)  # over every rank's shard (sharded growth)
            acc = 0.5 * (acc + acc.transpose(1, 2))
            # float64: LAPACK's float32 eigh fails to converge on some ill-conditioned S
            ev, V = torch.linalg.eigh(acc.double())
            vals[n].append(ev[:, 0].to(acc.dtype))
            vecs[n].append(V[:, :, 0].to(acc.dtype))
            if return_matrices:
                mats[n].append(acc)
    eigs = {n: (torch.cat(vals[n]), torch.cat(vecs[n])) for n in paths if vals[n]}
    return eigs, ({n: torch.cat(m) for n, m in mats.items() if m} if return_matrices else {})


def fast_eigs(
    model: nn.Module,
    paths: dict[str, UnitPath],
    batches: list[tuple[Any, Any]],
    loss_fn: LossFn,
    iters: int = 30,
    tol: float = 1e-6,
    memory_limit: int = 1 << 30,
    beta: float = 3.0,
    gen: torch.Generator | None = None,
) -> Eigs:
    """Minimum Rayleigh quotient of every unit's splitting matrix from products S_i v only.

    The per-batch rows (x, w) are cached when they fit `memory_limit`, else every product re-reads the
    batches. All units of a group are iterated at once; stops when every residual is below
    `tol`·(|ρ| + ||S v||-scale).
    """
    if not paths:
        return {}
    gen = gen if gen is not None else torch.Generator().manual_seed(0)

    def rows() -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        for stats in collect(model, paths, batches, loss_fn):
            yield {n: (d.X, unit_weights(model, paths[n], d, beta)) for n, d in stats.items()}

    itemsize = next(model.parameters()).element_size()
    cache: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = []
    total = 0
    stream = rows()
    try:
        for data in stream:
            total += sum(X.numel() + w.numel() for X, w in data.values()) * itemsize
            if total > memory_limit:
                cache = None  # too big to keep: every product re-reads the batches
                break
            cache.append(data)
    finally:
        stream.close()
    nb = len(batches)
    samples = sum(len(y) for _, y in batches)

    def matvec(Q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """S_i q for every unit i and column q of Q[name] [C, D, k]."""
        out = {n: torch.zeros_like(q) for n, q in Q.items()}
        for data in (cache if cache is not None else rows()):
            for n, q in Q.items():
                X, w = data[n]
                C, D, k = q.shape
                m = _position_chunk(X.shape[0], C * k * X.element_size(), memory_limit)
                for p0 in range(0, X.shape[0], m):
                    Xc = X[p0:p0 + m]
                    if X.dim() == 2:
                        P = torch.einsum("nd,cdk->nck", Xc, q) * w[p0:p0 + m, :, None]
                        out[n] += torch.einsum("nck,nd->cdk", P, Xc)
                    else:
                        P = torch.einsum("ncd,cdk->nck", Xc, q) * w[p0:p0 + m, :, None]
                        out[n] += torch.einsum("nck,ncd->cdk", P, Xc)
        return current_sync().mean_dict({n: v / nb for n, v in out.items()}, samples)  # every rank's shard

    V, SV, P = {}, {}, {}
    for n, p in paths.items():
        C, D = p.group.width, p.dim(model)
        ref = p.incoming(model)
        v = torch.randn(C, D, 1, generator=gen, dtype=torch.float64).to(device=ref.device, dtype=ref.dtype)
        V[n] = v / v.norm(dim=1, keepdim=True)
    SV = matvec(V)
    rho = {n: (V[n] * SV[n]).sum(1) for n in V}  # [C, 1]
    for _ in range(iters):
        R = {n: SV[n] - rho[n][:, None, :] * V[n] for n in V}
        scale = {n: SV[n].norm(dim=1).max().clamp_min(1e-30) for n in V}
        if all(float(R[n].norm(dim=1).max()) <= tol * float(scale[n]) for n in V):
            break
        Q = {}
        for n in V:
            cols = [V[n], R[n]] + ([P[n]] if n in P else [])
            Q[n] = torch.linalg.qr(torch.cat(cols, 2)).Q  # [C, D, k'], first column ∥ v
        SQ = matvec(Q)
        for n in V:
            T = Q[n].transpose(1, 2) @ SQ[n]
            ev, Y = torch.linalg.eigh((0.5 * (T + T.transpose(1, 2))).double())
            ev, Y = ev.to(T.dtype), Y.to(T.dtype)
            y = Y[:, :, :1]  # [C, k', 1]
            P[n] = Q[n][:, :, 1:] @ y[:, 1:]
            V[n] = Q[n] @ y
            nv = V[n].norm(dim=1, keepdim=True)
            V[n], SV[n] = V[n] / nv, (SQ[n] @ y) / nv
            rho[n] = ev[:, :1]
    return {n: ((V[n] * SV[n]).sum(1)[:, 0], V[n][:, :, 0]) for n in V}


class _Splitting(BaselineGrower):
    """Shared selection and plan writing of both splitting variants."""

    name = "splitting"
    sharded_growth = True  # S_i (or S_i v) reduced through collective.current_sync()

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        eps: float = 0.1,
        relative_eps: bool = True,
        batches: int | None = 8,
        memory_limit: int = 1 << 30,
        beta: float = 3.0,
        energy_aware: bool = False,
        groups: list[str] | None = None,
        per_group: bool = False,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, not {eps}")
        self.eps, self.relative_eps = float(eps), bool(relative_eps)
        self.memory_limit, self.beta, self.energy_aware = int(memory_limit), float(beta), bool(energy_aware)

    @abc.abstractmethod
    def eigs(self, ctx: Context, paths: dict[str, UnitPath]) -> Eigs:
        """Minimum eigenvalue and eigenvector of every unit's splitting matrix (exact or matrix-free)."""

    def paths(self, ctx: Context) -> dict[str, UnitPath]:
        """Groups this method can score; a group named in `groups=` that does not fit raises."""
        paths, skipped = find_paths(ctx.model, ctx.groups, ctx.x, self.name)
        skipped.update(verify_paths(ctx.model, paths, ctx.batches[0], self.name))
        for n, why in skipped.items():
            if self.group_names is not None:
                raise GrowthError(f"group {n!r}: {why}")
        ctx.skipped.update(skipped)
        return paths

    def analyse(self, model: nn.Module, data: Iterable[Any], loss_fn: LossFn, example_inputs: Any = None) -> Eigs:
        """The minimum eigenvalue and unit eigenvector of every eligible unit (no growth)."""
        ctx = self.begin(model, data, loss_fn, example_inputs)
        return self.eigs(ctx, self.paths(ctx))

    def decide(self, ctx: Context) -> Plan:
        report = ctx.report
        with Timer(report.timings, "score"):
            paths = self.paths(ctx)
            eigs = self.eigs(ctx, paths)
        with Timer(report.timings, "select"):
            plan, predicted = self.plan(ctx, paths, eigs)
        report.predicted_loss_change = predicted
        report.extra["min_eigenvalues"] = {n: float(v.min()) for n, (v, _) in eigs.items()}
        report.extra["negative_units"] = {n: int((v < 0).sum()) for n, (v, _) in eigs.items()}
        return plan

    def plan(self, ctx: Context, paths: dict[str, UnitPath], eigs: Eigs) -> tuple[Any, float]:
        costs = unit_costs(ctx, self.budget)
        energy = None
        if self.energy_aware and self.budget.currency == "units" and eigs:
            flops = group_unit_costs(Budget("flops", 1.0), [paths[n].group for n in eigs], ctx.model, ctx.x)
            mean = sum(flops.values()) / len(flops)
            energy = {n: f / mean for n, f in flops.items()}
            ctx.report.extra["energy"] = energy
        cands = []
        for n, (vals, _) in eigs.items():
            for i, lam in enumerate(vals.tolist()):
                if lam < 0:
                    score = lam / energy[n] if energy else lam
                    cands.append(Candidate("split", n, i, score, costs[n]))
        kept = select(cands, self.budget, ctx.groups)
        by_group: dict[str, list[int]] = {}
        for c in kept:
            by_group.setdefault(c.group, []).append(c.index)
        changes, predicted = [], 0.0
        for n, units in by_group.items():
            path, (vals, vecs) = paths[n], eigs[n]
            theta = path.incoming(ctx.model)
            splits = []
            for i in sorted(units):
                step = self.eps * (float(theta[i].norm()) if self.relative_eps else 1.0)
                dirs = {k: v.detach().cpu() for k, v in path.vector_to_slices(ctx.model, vecs[i]).items()}
                splits.append(Split(i, dirs, eps=step))
                predicted += 0.5 * step * step * float(vals[i])
            changes.append(GroupChange(path.group, splits=splits))
        return self.make_plan(ctx, changes, preserving=self.eps == 0), predicted


@register_grower("splitting-exact")
class SplittingExact(_Splitting):
    """Splitting steepest descent with explicit D×D splitting matrices and `eigh`.

    kwargs: budget=0.35, seed=0, eps=0.1 (step; × the unit's incoming-weight norm when relative_eps),
    relative_eps=True, batches=8, memory_limit=1 GiB, beta=3.0 (softplus surrogate for ReLU),
    energy_aware=False, groups=None.
    """

    name = "splitting-exact"

    def eigs(self, ctx: Context, paths: dict[str, UnitPath]) -> Eigs:
        return exact_eigs(ctx.model, paths, ctx.batches, ctx.loss_fn, self.memory_limit, self.beta)[0]

    def matrices(
        self, model: nn.Module, data: Iterable[Any], loss_fn: LossFn, example_inputs: Any = None
    ) -> dict[str, torch.Tensor]:
        """The splitting matrices S_i [C, D, D] of every eligible group (for inspection and tests)."""
        ctx = self.begin(model, data, loss_fn, example_inputs)
        return exact_eigs(ctx.model, self.paths(ctx), ctx.batches, ctx.loss_fn, self.memory_limit, self.beta,
                          return_matrices=True)[1]


@register_grower("splitting-fast")
class SplittingFast(_Splitting):
    """Splitting without forming S_i: batched Rayleigh-quotient descent from matrix-vector products.

    kwargs: as splitting-exact, plus iters=30, tol=1e-6; energy_aware=True ranks units by
    eigenvalue ÷ (unit FLOP cost / mean) under a units budget (params/FLOPs budgets already rank per cost).
    """

    name = "splitting-fast"

    def __init__(self, *args: Any, iters: int = 30, tol: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.iters, self.tol = int(iters), float(tol)

    def eigs(self, ctx: Context, paths: dict[str, UnitPath]) -> Eigs:
        return fast_eigs(ctx.model, paths, ctx.batches, ctx.loss_fn, self.iters, self.tol, self.memory_limit,
                         self.beta, ctx.gen)
