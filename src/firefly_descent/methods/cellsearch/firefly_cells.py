"""Firefly descent on DARTS cells: grow new edges ε·o(x_j) into the nodes of every cell of a type.

The neighbourhood of a cell network is its set of missing edges (op, source j, node i), one candidate per
cell type, shared by all cells of that type as DARTS shares its genotype. The over-grown network is built
with the engine: a deep copy of the model receives every candidate as a `NewBranch` at scale 0 (the
engine verifies that this is exactly the same function). Each candidate's branches in all its cells are
then scaled by one shared trainable ε_c (a `torch.nn.utils.parametrize` parametrisation of each branch's
scale), times a gate (α + g_c).

Step one trains the candidates' operations and ε (old weights and BatchNorm statistics frozen, eval
mode). Step two integrates ∂L/∂g_c along the path α ∈ (0, 1] (midpoint rule, all candidates moving
together), which sums over the cells a candidate changes: s_c ≈ L(with c at ε̃_c) - L(without), to first
order in the other candidates. The most negative scores are kept greedily under a parameter budget, and
a `Plan` with one `NewBranch` per kept candidate and cell (trained operation, scale ε̃_c) is applied to the
model by the engine. New BatchNorms of kept branches are calibrated so that train mode computes what
eval mode scored.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from ...budget import count_flops
from ...engine import apply, calibrate_new_batchnorm
from ...errors import GrowthError, VerificationError
from ...models.darts import DartsNetwork, Node
from ...plan import NewBranch, Plan
from .space import SEARCH_OPS, EdgeCandidate, candidate_cost, candidate_edges, cells_of

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Scales(nn.Module):
    """Shared per-candidate scales ε_c times gates (α + g_c)."""

    def __init__(self, n: int, eps_init: float) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.full((n,), float(eps_init)))
        self.alpha = 1.0
        self.gate = torch.zeros(n)

    def value(self, c: int) -> torch.Tensor:
        return self.eps[c] * (self.alpha + self.gate[c])


class _SharedScale(nn.Module):
    """Parametrisation of one branch's scale: the candidate's shared ε_c·(α + g_c)."""

    def __init__(self, scales: _Scales, c: int) -> None:
        super().__init__()
        self._scales = [scales]  # not a submodule: the bank is shared by many branches
        self.c = c

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        return self._scales[0].value(self.c)


def branch_plan(model: DartsNetwork, cands: list[EdgeCandidate], scale: float = 0.0) -> Plan:
    """A plan adding each candidate's operation to every cell of its type (default initialisation)."""
    branches = []
    for cand in cands:
        for k in cells_of(model, cand.kind):
            cell = model.cells[k]
            spec = {"type": "darts_op", "op": cand.op, "channels": cell.channels, "stride": cell.stride(cand.source)}
            branches.append(
                NewBranch(f"cells.{k}.nodes.{cand.node - 2}", spec, {"source": cand.source, "op": cand.op}, {}, scale)
            )
    return Plan(branches=branches, method="firefly-cells", function_preserving=scale == 0.0, tolerance=1e-5)


@dataclass
class OvergrownCells:
    """The model with every candidate switched on, and where each candidate's branches live."""

    net: DartsNetwork
    scales: _Scales
    branches: dict[int, list[tuple[str, nn.Module]]] = field(default_factory=dict)  # candidate -> (node, branch)


def build_overgrown(
    model: DartsNetwork, cands: list[EdgeCandidate], eps_init: float, example_inputs: torch.Tensor | None
) -> OvergrownCells:
    """Deep-copy `model`, add every candidate by the engine at scale 0 (verified exact), then share scales."""
    net = copy.deepcopy(model)
    try:
        apply(net, branch_plan(net, cands, 0.0), example_inputs=example_inputs, record=False)
    except VerificationError as e:
        raise GrowthError(
            "new edges could not be added to the cells (every operation maps C channels to C; a network whose "
            f"cells were widened group by group no longer has one width per cell): {e}"
        ) from None
    ref = next(net.parameters())
    scales = _Scales(len(cands), eps_init).to(ref.device, ref.dtype)
    scales.gate = scales.gate.to(ref.device, ref.dtype)
    out = OvergrownCells(net, scales)
    counts: dict[str, int] = {}
    for c, cand in enumerate(cands):
        for k in cells_of(net, cand.kind):
            node_name = f"cells.{k}.nodes.{cand.node - 2}"
            node = net.get_submodule(node_name)
            assert isinstance(node, Node)
            base = len(node.edges) - sum(1 for cc in cands if cc.kind == cand.kind and cc.node == cand.node)
            pos = base + counts.get(node_name, 0)
            counts[node_name] = counts.get(node_name, 0) + 1
            branch = node.edges[pos]
            parametrize.register_parametrization(branch, "scale", _SharedScale(scales, c))
            out.branches.setdefault(c, []).append((node_name, branch))
    return out


def _batches(loader: Iterable[Any], n: int | None, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for b, (x, y) in enumerate(loader):
        if n is not None and b >= n:
            break
        yield x.to(device), y.to(device)


def integrated_scores(
    over: OvergrownCells, loader: Iterable[Any], loss_fn: LossFn, points: int = 4, batches: int | None = None
) -> torch.Tensor:
    """s_c = mean over data and midpoints α_k of ∂L/∂g_c: ∫_0^1 ε̃_c ∂L/∂ζ_c dα on the diagonal path."""
    net, sc = over.net, over.scales
    device = sc.eps.device
    total = torch.zeros_like(sc.eps, dtype=torch.float64)
    count = 0
    net.eval()
    for x, y in _batches(loader, batches, device):
        for k in range(points):
            sc.alpha = (2 * k + 1) / (2 * points)
            sc.gate = torch.zeros_like(sc.eps).requires_grad_(True)
            loss = loss_fn(net(x), y)
            (g,) = torch.autograd.grad(loss, sc.gate)
            total += g.detach().double() * x.shape[0] / points
        count += x.shape[0]
    sc.alpha = 1.0
    sc.gate = torch.zeros_like(sc.eps)
    return (total / max(count, 1)).float()


@dataclass
class CellGrowthReport:
    """What one round of cell growth did."""

    candidates: int
    kept: list[str]
    scores: dict[str, float]
    params_before: int
    params_after: int
    loss_before: float
    loss_after: float
    predicted_loss_change: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FireflyCells:
    """Grow DARTS cells by Firefly descent over new edges (see module doc).

    budget: what one round may add, as an int, or as a fraction of the model's current size; `cost` says in
    what: "params" (parameters) or "flops" (FLOPs of one forward of one sample, flop_counter).
    max_edges: at most this many candidates kept per round; max_in_degree: edges per node (2 = the DARTS
    space); distinct_inputs: a node's edges come from distinct nodes (else two operations may share a pair).
    Step one: `step_one_batches` batches of RMSprop on the candidates (None = one pass);
    step two: `points` midpoints over `score_batches` batches.
    """

    def __init__(
        self,
        budget: float = 0.5,
        max_edges: int = 4,
        max_in_degree: int | None = 2,
        ops: tuple[str, ...] = SEARCH_OPS,
        eps_init: float = 0.05,
        eps_max: float = 1.0,
        lr: float = 1e-3,
        step_one_batches: int | None = None,
        score_batches: int | None = None,
        points: int = 4,
        calibrate_batches: int = 10,
        cost: str = "params",
        distinct_inputs: bool = False,
    ) -> None:
        bad = [op for op in ops if op not in SEARCH_OPS]
        if bad:
            raise ValueError(f"unknown or excluded operation(s) {bad}; candidates use {', '.join(SEARCH_OPS)}")
        self.budget, self.max_edges, self.max_in_degree = budget, int(max_edges), max_in_degree
        self.ops, self.eps_init, self.eps_max, self.lr = tuple(ops), float(eps_init), float(eps_max), float(lr)
        self.step_one_batches, self.score_batches, self.points = step_one_batches, score_batches, int(points)
        self.calibrate_batches = int(calibrate_batches)
        if cost not in ("params", "flops"):
            raise ValueError(f"cost must be 'params' or 'flops', got {cost!r}")
        self.cost = cost
        self.distinct_inputs = bool(distinct_inputs)

    def _budget(self, model: DartsNetwork) -> float:
        if self.budget >= 1:
            return float(self.budget)
        if self.cost == "flops":
            size = model.cells[0].input_size
            x = torch.zeros(1, model.stem[0].in_channels, size, size, device=next(model.parameters()).device)
            return float(self.budget) * count_flops(model, x)
        return float(self.budget) * sum(p.numel() for p in model.parameters())

    def step_one(self, over: OvergrownCells, loader: Iterable[Any], loss_fn: LossFn) -> None:
        """Train the candidates' operations and scales; old weights and BatchNorm statistics frozen."""
        net, sc = over.net, over.scales
        new_params = [sc.eps] + [
            p for branches in over.branches.values() for _, b in branches for p in b.body.parameters()
        ]
        ids = {id(p) for p in new_params}
        for p in net.parameters():
            if id(p) not in ids:
                p.requires_grad_(False)
        opt = torch.optim.RMSprop(new_params, lr=self.lr, alpha=0.9, momentum=0.1)
        net.eval()
        for x, y in _batches(loader, self.step_one_batches, sc.eps.device):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
            with torch.no_grad():
                sc.eps.clamp_(-self.eps_max, self.eps_max)

    def select(self, model: DartsNetwork, cands: list[EdgeCandidate], scores: torch.Tensor) -> list[int]:
        """Greedy: most negative scores first, within the parameter budget, edge and in-degree limits."""
        budget, spent, kept = self._budget(model), 0.0, []
        degree: dict[tuple[str, int], int] = {}
        for kind in ("normal", "reduce"):
            idx = cells_of(model, kind)
            if idx:
                for n, node in enumerate(model.cells[idx[0]].nodes):
                    degree[(kind, n + 2)] = len(node.sources)
        for c in sorted(range(len(cands)), key=lambda i: float(scores[i])):
            cand = cands[c]
            if float(scores[c]) >= 0 or len(kept) >= self.max_edges:
                break
            cost = candidate_cost(model, cand, self.cost)
            if spent + cost > budget:
                continue
            if self.max_in_degree is not None and degree[(cand.kind, cand.node)] >= self.max_in_degree:
                continue
            kept.append(c)
            spent += cost
            degree[(cand.kind, cand.node)] += 1
        return kept

    def grow(
        self,
        model: DartsNetwork,
        loader: Iterable[Any],
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: torch.Tensor | None = None,
    ) -> CellGrowthReport:
        """One Firefly round: candidates, step one, step two, selection, plan applied by the engine."""
        if not isinstance(model, DartsNetwork):
            raise GrowthError(f"cell growth needs a DartsNetwork, got {type(model).__name__}")
        cands = candidate_edges(model, self.ops, self.max_in_degree, self.distinct_inputs)
        device = next(model.parameters()).device
        if example_inputs is None:
            example_inputs = next(iter(loader))[0][:2].to(device)
        params_before = sum(p.numel() for p in model.parameters())
        # the same batches for the loss before, the scores and the loss after: a paired measurement
        fixed = list(_batches(loader, self.score_batches, device))
        loss_before = _mean_loss(model, fixed, loss_fn, None)
        if not cands:
            return CellGrowthReport(0, [], {}, params_before, params_before, loss_before, loss_before, 0.0)
        over = build_overgrown(model, cands, self.eps_init, example_inputs)
        self.step_one(over, loader, loss_fn)
        scores = integrated_scores(over, fixed, loss_fn, self.points)
        kept = self.select(model, cands, scores)
        plan = Plan(method="firefly-cells", function_preserving=False)
        for c in kept:
            for node_name, branch in over.branches[c]:
                cell = model.get_submodule(node_name.split(".nodes.")[0])
                spec = {
                    "type": "darts_op", "op": cands[c].op, "channels": cell.channels,
                    "stride": cell.stride(cands[c].source),
                }
                params = {k: v.detach().clone() for k, v in branch.body.state_dict().items()}
                eps = float(over.scales.eps[c].detach())
                plan.branches.append(NewBranch(node_name, spec, {"source": cands[c].source, "op": cands[c].op},
                                               params, eps))
        del over
        if plan.branches:
            n_before = {name: len(model.get_submodule(name).edges) for name in {b.into for b in plan.branches}}
            apply(model, plan, optimizer, example_inputs=example_inputs)
            channels = {}
            for name, n in n_before.items():
                node = model.get_submodule(name)
                for e in range(n, len(node.edges)):
                    for sub, m in node.edges[e].named_modules():
                        if isinstance(m, nn.BatchNorm2d) and m.affine:
                            channels[f"{name}.edges.{e}.{sub}"] = list(range(m.num_features))
            xs = [x for x, _ in _batches(loader, self.calibrate_batches, device)]
            with torch.no_grad():
                calibrate_new_batchnorm(model, channels, xs)
        loss_after = _mean_loss(model, fixed, loss_fn, None)
        return CellGrowthReport(
            candidates=len(cands),
            kept=[str(cands[c]) for c in kept],
            scores={str(cands[c]): float(scores[c]) for c in range(len(cands))},
            params_before=params_before,
            params_after=sum(p.numel() for p in model.parameters()),
            loss_before=loss_before,
            loss_after=loss_after,
            predicted_loss_change=float(sum(float(scores[c]) for c in kept)),
        )


@torch.no_grad()
def _mean_loss(model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, batches: int | None) -> float:
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for x, y in _batches(loader, batches, device):
        total += float(loss_fn(model(x), y)) * x.shape[0]
        n += x.shape[0]
    model.train(was)
    return total / max(n, 1) if n else math.nan
