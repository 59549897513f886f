"""Firefly descent on DARTS cells: new edges, wider cells and new cells compete in one selection.

Candidates: a new edge ε·o(x_j) into node i of every cell of a type (shared, as DARTS shares its
genotype); a wider cell type (new units in every channel group produced inside its cells, so each cell
keeps one width); a new normal cell in residual form after a normal cell (z + ε·cell(z, z)). Each kind
gets an over-grown copy built by the engine at zero (verified exact) whose candidates are scaled by a
shared ε_c times a gate (α + g_c) (for widening: the new weight entries times the gate). Step one trains
the candidates with old weights and BatchNorm statistics frozen (eval mode). Step two integrates ∂L/∂g_c
along α ∈ (0, 1] (midpoint rule), which sums over the cells a candidate changes: s_c ≈ L(with c) - L(without),
to first order in the other candidates of its copy. One greedy selection over all kinds by score per cost
under a parameter or FLOP budget; the kept candidates become one `Plan` (width changes, `NewLayer`s,
`NewBranch`es with their trained weights) committed through `methods.safety.commit` (held-out check,
undone as a whole if the loss rose). New BatchNorms are calibrated so that train mode computes what eval
mode scored.
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

from ...analysis import analyze
from ...analysis.rules import is_batchnorm
from ...analysis.trace import as_input_tuple
from ...budget import count_flops
from ...engine import apply, calibrate_new_batchnorm
from ...engine.apply import plan_edits
from ...errors import GrowthError, VerificationError
from ...layers import build_body
from ...models.darts import Cell, DartsNetwork, Node, base_cell, cell_paths
from ...plan import GroupChange, NewBranch, NewLayer, NewUnits, Plan
from ..base import GrowthReport
from ..safety import GrowthData, Safeguard, commit, settle_batchnorm
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
        for path, cell in cells_of(model, cand.kind):
            spec = {"type": "darts_op", "op": cand.op, "channels": cell.channels, "stride": cell.stride(cand.source)}
            branches.append(
                NewBranch(f"{path}.nodes.{cand.node - 2}", spec, {"source": cand.source, "op": cand.op}, {}, scale)
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
        for path, _ in cells_of(net, cand.kind):
            node_name = f"{path}.nodes.{cand.node - 2}"
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


@dataclass(frozen=True)
class WidenCandidate:
    """Widen every cell of type `kind`: each of its channel groups gets new units, C -> C + Δ per cell."""

    kind: str

    def __str__(self) -> str:
        return f"{self.kind}:widen"


@dataclass(frozen=True)
class CellCandidate:
    """A new normal cell in residual form after top-level cell `after` (z -> z + ε·cell(z, z))."""

    after: str

    def __str__(self) -> str:
        return f"normal:cell-after-{self.after}"


Candidate = EdgeCandidate | WidenCandidate | CellCandidate
KINDS_OF_GROWTH = ("edges", "widen", "cells")
RANKS = ("efficiency", "score")


class _Gated(nn.Module):
    """Parametrisation of a widened tensor: its new entries (mask) times the candidate's ε·(α + g)."""

    def __init__(self, mask: torch.Tensor, scales: _Scales, c: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self._scales = [scales]
        self.c = c

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self._scales[0].value(self.c) * w, w)


def widen_plan(model: DartsNetwork, kind: str, fraction: float, example_inputs: torch.Tensor) -> Plan:
    """New units in every channel group produced inside the cells of type `kind` (found by the analysis):
    Δ = max(2, round(fraction·C)) per cell, so every node, input and operation of a cell keeps one width
    C + Δ and later new edges (C -> C operations) still fit. Random incoming, zero outgoing: exact."""
    own = [(path, c) for path, c, _ in cell_paths(model)]
    mine = {path for path, _ in cells_of(model, kind)}

    def owner(tensor: str) -> tuple[str, Cell] | None:
        hits = [(p, c) for p, c in own if tensor.startswith(p + ".")]
        return max(hits, key=lambda h: len(h[0])) if hits else None

    changes = []
    for g in analyze(model, example_inputs).groups.values():
        owners = {owner(m.tensor) for m in g.producers()}
        paths = {o[0] if o else None for o in owners}
        if not paths & mine:
            continue
        if not paths <= mine:
            raise GrowthError(f"group {g.name!r} is produced in cells of both types; {kind} cells cannot widen alone")
        g.check_growable()
        cell = next(o for o in owners if o is not None)[1]
        d = max(2, int(round(fraction * cell.channels)))
        names = " ".join(m.tensor for m in g.producers())
        if g.width == cell.channels:
            n = d
        elif ".conv_1." in names and ".conv_2." not in names:  # halves of a factorized reduce
            n = d // 2
        elif ".conv_2." in names and ".conv_1." not in names:
            n = d - d // 2
        else:
            raise GrowthError(f"group {g.name!r} has width {g.width}, not the cell's {cell.channels}")
        changes.append(GroupChange(g, new=NewUnits(n, init="random")))
    if not changes:
        raise GrowthError(f"no {kind} cell to widen")
    return Plan(changes=changes, method="firefly-cells", function_preserving=True, tolerance=1e-5)


def _split_name(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


def build_widened(
    model: DartsNetwork, plan: Plan, example_inputs: torch.Tensor
) -> tuple[OvergrownCells, dict[str, torch.Tensor]]:
    """A copy of `model` widened by `plan` through the engine (verified exact), with its new entries gated by
    one scale (fixed ε = 1: the new weights carry the size). Returns it and the masks of new entries."""
    net = copy.deepcopy(model)
    apply(net, plan, example_inputs=example_inputs, record=False)
    marker = copy.deepcopy(model)
    with torch.no_grad():
        for p in marker.parameters():
            p.fill_(1.0)
    zero = Plan(changes=[GroupChange(c.group, new=NewUnits(c.new.count, init="zero")) for c in plan.changes
                         if c.new is not None], function_preserving=False)
    apply(marker, zero, verify=False, record=False)
    ref = next(net.parameters())
    scales = _Scales(1, 1.0).to(ref.device, ref.dtype)
    scales.eps.requires_grad_(False)
    scales.gate = scales.gate.to(ref.device, ref.dtype)
    masks: dict[str, torch.Tensor] = {}
    for name, p in marker.named_parameters():
        m = p != 1.0
        if bool(m.any()):
            masks[name] = m
    over = OvergrownCells(net, scales)
    for name, m in masks.items():
        mod_name, attr = _split_name(name)
        module = net.get_submodule(mod_name)
        parametrize.register_parametrization(module, attr, _Gated(m, scales, 0))
        over.branches.setdefault(0, []).append((name, module))
    return over, masks


def cell_layer_spec(model: DartsNetwork, after: str) -> dict[str, Any]:
    """The spec of a new residual normal cell after top-level cell `after`: the current normal genotype at
    that cell's width."""
    base = base_cell(model.get_submodule(after))
    normal = cells_of(model, "normal")[0][1]
    size = (base.input_size + 1) // 2 if base.reduction else base.input_size
    return {"type": "darts_cell", "edges": [list(e) for e in normal.edges()], "concat": list(normal.concat),
            "steps": len(normal.nodes), "c_out": len(normal.concat) * base.channels, "channels": base.channels,
            "input_size": size}


def candidate_cells(model: DartsNetwork, max_cells: int) -> list[CellCandidate]:
    """One new cell after each top-level normal cell (a residual cell keeps the resolution and width), while
    the network has fewer than `max_cells` new cells."""
    inserted = len(cell_paths(model)) - len(model.cells)
    if inserted >= max_cells:
        return []
    return [CellCandidate(f"cells.{k}") for k, c in enumerate(model.cells) if not base_cell(c).reduction]


def build_overgrown_cells(
    model: DartsNetwork, cands: list[CellCandidate], eps_init: float, example_inputs: torch.Tensor
) -> OvergrownCells:
    """Deep-copy `model`, insert every new cell by the engine at scale 0 (verified exact), share scales."""
    net = copy.deepcopy(model)
    layers = [NewLayer(c.after, "residual", cell_layer_spec(model, c.after), {}, 0.0) for c in cands]
    apply(net, Plan(layers=layers, method="firefly-cells", tolerance=1e-5), example_inputs=example_inputs,
          record=False)
    ref = next(net.parameters())
    scales = _Scales(len(cands), eps_init).to(ref.device, ref.dtype)
    scales.gate = scales.gate.to(ref.device, ref.dtype)
    out = OvergrownCells(net, scales)
    for c, cand in enumerate(cands):
        res = net.get_submodule(cand.after)[-1]
        parametrize.register_parametrization(res, "scale", _SharedScale(scales, c))
        out.branches[c] = [(cand.after, res)]
    return out


def _train_widened(over: OvergrownCells, masks: dict[str, torch.Tensor], batches: list[Any], loss_fn: LossFn,
                   lr: float) -> None:
    """Step one for a widening: train only the new entries (old weights and BatchNorm statistics frozen)."""
    net = over.net
    for p in net.parameters():
        p.requires_grad_(False)
    params = []
    for name, m in masks.items():
        mod_name, attr = _split_name(name)
        orig = net.get_submodule(mod_name).parametrizations[attr].original
        orig.requires_grad_(True)
        orig.register_hook(lambda g, m=m: g * m)
        params.append(orig)
    opt = torch.optim.RMSprop(params, lr=lr, alpha=0.9, momentum=0.1)
    net.eval()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()


def _renamed(name: str, afters: list[str]) -> str:
    """A module path after layers were inserted after `afters` (the wrapped module is child 0)."""
    for a in afters:
        if name == a or name.startswith(a + "."):
            return a + ".0" + name[len(a):]
    return name


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
    costs: dict[str, float] = field(default_factory=dict)
    outcome: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # candidate kinds that could not be built, and why
    undone: list[str] = field(default_factory=list)  # selected, but the safeguard took the step back

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FireflyCells:
    """Grow DARTS cells by Firefly descent over new edges, wider cells and new cells (see module doc).

    kinds: which candidates compete ("edges", "widen", "cells"); widen: Δ = max(2, round(widen·C)) new
    channels per cell when a cell type widens; max_cells: new cells the network may hold in all.
    rank: "efficiency" keeps the most negative score per cost first, "score" the most negative score.
    budget: what one round may add, as an int, or as a fraction of the model's current size; `cost` says in
    what: "params" (parameters) or "flops" (FLOPs of one forward of one sample, flop_counter).
    max_edges: at most this many new edges kept per round; max_in_degree: edges per node (2 = the DARTS
    space); distinct_inputs: a node's edges come from distinct nodes (else two operations may share a pair).
    Step one: `step_one_batches` batches of RMSprop on the candidates (None = one pass);
    step two: `points` midpoints over `score_batches` batches.
    safeguard: the after-apply check of `methods.safety` (a dict of `Safeguard` options; {"check": False}
    applies without measuring held-out loss).
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
        kinds: tuple[str, ...] = KINDS_OF_GROWTH,
        rank: str = "efficiency",
        widen: float = 0.5,
        max_cells: int = 2,
        safeguard: Safeguard | dict[str, Any] | None = None,
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
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds or any(k not in KINDS_OF_GROWTH for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {', '.join(KINDS_OF_GROWTH)}, got {list(kinds)}")
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
        if not 0 < float(widen) <= 4:
            raise ValueError(f"widen must be in (0, 4] (new channels per cell as a fraction of C), got {widen}")
        if int(max_cells) < 0:
            raise ValueError(f"max_cells must be >= 0, got {max_cells}")
        self.kinds, self.rank, self.widen, self.max_cells = kinds, rank, float(widen), int(max_cells)
        self.safeguard = Safeguard.parse(safeguard)

    def _budget(self, model: DartsNetwork) -> float:
        if self.budget >= 1:
            return float(self.budget)
        if self.cost == "flops":
            return float(self.budget) * count_flops(model, _one_sample(model))
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

    def select(self, model: DartsNetwork, cands: list[Candidate], scores: torch.Tensor,
               costs: list[float] | None = None) -> list[int]:
        """One greedy selection over all kinds: most negative score (per cost, with rank "efficiency") first,
        within the budget, at most `max_edges` edges, `max_in_degree` per node and `max_cells` new cells.
        A widened cell type takes no new edge in the same round (the edges were trained at the old width),
        a widened normal type no new cell, and one type widens per round (the tensors between a normal
        and a reduction cell were trained in separate over-grown copies)."""
        if costs is None:
            costs = [float(self._cost(model, c)) for c in cands]
        budget, spent, kept = self._budget(model), 0.0, []
        degree: dict[tuple[str, int], int] = {}
        for kind in ("normal", "reduce"):
            idx = cells_of(model, kind)
            if idx:
                for n, node in enumerate(idx[0][1].nodes):
                    degree[(kind, n + 2)] = len(node.sources)
        n_edges, n_cells = 0, len(cell_paths(model)) - len(model.cells)
        widened: set[str] = set()
        edged: set[str] = set()
        celled = False

        def key(i: int) -> float:
            s = float(scores[i])
            return s / max(costs[i], 1.0) if self.rank == "efficiency" else s

        for c in sorted(range(len(cands)), key=key):
            cand = cands[c]
            if float(scores[c]) >= 0:
                break
            if spent + costs[c] > budget:
                continue
            if isinstance(cand, EdgeCandidate):
                if n_edges >= self.max_edges or cand.kind in widened:
                    continue
                if self.max_in_degree is not None and degree[(cand.kind, cand.node)] >= self.max_in_degree:
                    continue
                degree[(cand.kind, cand.node)] += 1
                n_edges += 1
                edged.add(cand.kind)
            elif isinstance(cand, WidenCandidate):
                if widened or cand.kind in edged or (cand.kind == "normal" and celled):
                    continue
                widened.add(cand.kind)
            else:
                if n_cells >= self.max_cells or "normal" in widened:
                    continue
                n_cells += 1
                celled = True
            kept.append(c)
            spent += costs[c]
        return kept

    def _cost(self, model: DartsNetwork, cand: Candidate, over: nn.Module | None = None) -> float:
        if isinstance(cand, EdgeCandidate):
            return float(candidate_cost(model, cand, self.cost))
        if isinstance(cand, CellCandidate):
            spec = cell_layer_spec(model, cand.after)
            body = build_body(spec)
            if self.cost == "params":
                return float(sum(p.numel() for p in body.parameters()) + 1)
            x = torch.zeros(1, spec["c_out"], spec["input_size"], spec["input_size"])
            return float(count_flops(body.eval(), x))
        assert over is not None
        if self.cost == "params":
            return float(sum(p.numel() for p in over.parameters()) - sum(p.numel() for p in model.parameters()))
        x = _one_sample(model)
        return float(count_flops(over, x) - count_flops(model, x))

    def grow(
        self,
        model: DartsNetwork,
        loader: Iterable[Any],
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: torch.Tensor | None = None,
    ) -> CellGrowthReport:
        """One Firefly round: candidates of every kind, step one, step two, one selection, one plan
        applied by the engine and checked by the safeguard (`methods.safety.commit`)."""
        if not isinstance(model, DartsNetwork):
            raise GrowthError(f"cell growth needs a DartsNetwork, got {type(model).__name__}")
        guard = self.safeguard
        device = next(model.parameters()).device
        data = GrowthData.of(loader, reserve=guard.check_batches if guard.check else 0)
        n = None if self.step_one_batches is None or self.score_batches is None else \
            max(self.step_one_batches, self.score_batches, self.calibrate_batches)
        decision = data.draw(n, device)
        if not decision:
            raise GrowthError("cell growth needs at least one batch of growth data")
        if example_inputs is None:
            example_inputs = decision[0][0][:2]
        settle_batchnorm(model, decision, guard)
        params_before = sum(p.numel() for p in model.parameters())
        # the same batches for the loss before, the scores and the loss after: a paired measurement
        fixed = decision[: self.score_batches] if self.score_batches else decision
        loss_before = _mean_loss(model, fixed, loss_fn, None)
        cands: list[Candidate] = []
        scores: list[float] = []
        costs: list[float] = []
        refused: dict[str, str] = {}
        found: dict[Candidate, tuple[OvergrownCells, int]] = {}
        widened: dict[WidenCandidate, tuple[Plan, OvergrownCells, dict[str, torch.Tensor]]] = {}
        # new edges and new cells: each kind trained in its own over-grown copy, scored by its gates
        pools = []
        if "edges" in self.kinds:
            edges = candidate_edges(model, self.ops, self.max_in_degree, self.distinct_inputs)
            pools.append((edges, build_overgrown))
        if "cells" in self.kinds:
            pools.append((candidate_cells(model, self.max_cells), build_overgrown_cells))
        for pool, build in pools:
            if not pool:
                continue
            over = build(model, pool, self.eps_init, example_inputs)
            self.step_one(over, decision, loss_fn)
            s = integrated_scores(over, fixed, loss_fn, self.points)
            for c, cand in enumerate(pool):
                cands.append(cand)
                scores.append(float(s[c]))
                costs.append(self._cost(model, cand))
                found[cand] = (over, c)
        if "widen" in self.kinds:
            for kind in ("normal", "reduce"):
                wc = WidenCandidate(kind)
                try:
                    plan = widen_plan(model, kind, self.widen, example_inputs)
                    over, masks = build_widened(model, plan, example_inputs)
                except GrowthError as e:
                    refused[str(wc)] = str(e)
                    continue
                _train_widened(over, masks, decision[: self.step_one_batches] if self.step_one_batches else decision,
                               loss_fn, self.lr)
                s = integrated_scores(over, fixed, loss_fn, self.points)
                cands.append(wc)
                scores.append(float(s[0]))
                costs.append(self._cost(model, wc, over.net))
                widened[wc] = (plan, over, masks)
        if not cands:
            return CellGrowthReport(0, [], {}, params_before, params_before, loss_before, loss_before, 0.0,
                                    refused=refused)
        kept = self.select(model, cands, torch.tensor(scores), costs)
        plan, copies = self._plan(model, [cands[c] for c in kept], found, widened)
        names_before = {name for name, _ in model.named_modules()}

        def finalize() -> None:
            """Widened tensors take their trained values; new operations' and cells' BatchNorms are
            calibrated so that train mode computes what eval mode scored."""
            afters = [ly.after for ly in plan.layers]
            with torch.no_grad():
                for name, value in copies.items():
                    mod_name, attr = _split_name(_renamed(name, afters))
                    module = model.get_submodule(mod_name)
                    assert getattr(module, attr).shape == value.shape, (name, getattr(module, attr).shape, value.shape)
                    getattr(module, attr).copy_(value)
                channels = {
                    name: list(range(m.num_features)) for name, m in model.named_modules()
                    if name not in names_before and is_batchnorm(m) and m.affine
                }
                xs = [x for x, _ in decision[: self.calibrate_batches]]
                if channels:
                    calibrate_new_batchnorm(model, channels, xs)

        report = GrowthReport(method="firefly-cells", params_before=params_before)
        commit(model, plan, report, as_input_tuple(example_inputs), optimizer, loss_fn, data, decision, guard,
               finalize=finalize if not plan.is_empty() else None, settled=True)
        loss_after = _mean_loss(model, fixed, loss_fn, None)
        chosen = [str(cands[c]) for c in kept]
        undone = chosen if report.outcome == "rolled-back" else []
        return CellGrowthReport(
            candidates=len(cands),
            kept=[] if undone else chosen,
            undone=undone,
            scores={str(c): s for c, s in zip(cands, scores)},
            params_before=params_before,
            params_after=sum(p.numel() for p in model.parameters()),
            loss_before=loss_before,
            loss_after=loss_after,
            predicted_loss_change=float(sum(scores[c] for c in kept)),
            costs={str(cands[c]): costs[c] for c in kept},
            outcome=report.outcome,
            refused=refused,
        )

    def _plan(
        self, model: DartsNetwork, kept: list[Candidate], found: dict[Any, tuple[OvergrownCells, int]],
        widened: dict[WidenCandidate, tuple[Plan, OvergrownCells, dict[str, torch.Tensor]]],
    ) -> tuple[Plan, dict[str, torch.Tensor]]:
        """One plan for every kept candidate, with its trained weights: width changes, new cells (kept new
        normal edges enter them too, at scale 0, so all normal cells share one genotype) and new edges.
        Also returns the trained values of the widened tensors (copied in after the engine widened them)."""
        plan = Plan(method="firefly-cells", function_preserving=False)
        copies: dict[str, torch.Tensor] = {}
        for cand in kept:
            if isinstance(cand, WidenCandidate):
                wplan, over, masks = widened[cand]
                plan.changes += wplan.changes
                for name, module in over.branches[0]:
                    parametrize.remove_parametrizations(module, _split_name(name)[1], leave_parametrized=True)
                state = over.net.state_dict()
                for tensor in plan_edits(wplan):
                    copies[tensor] = state[tensor].detach().clone()
        cells = [c for c in kept if isinstance(c, CellCandidate)]
        afters = [c.after for c in cells]
        for cand in cells:
            over, c = found[cand]
            res = over.branches[c][0][1]
            params = {k: v.detach().clone() for k, v in res.body.state_dict().items()}
            plan.layers.append(NewLayer(cand.after, "residual", cell_layer_spec(model, cand.after), params,
                                        float(over.scales.eps[c].detach())))
        for cand in kept:
            if not isinstance(cand, EdgeCandidate):
                continue
            over, c = found[cand]
            for node_name, branch in over.branches[c]:
                cell = model.get_submodule(node_name.split(".nodes.")[0])
                spec = {"type": "darts_op", "op": cand.op, "channels": cell.channels,
                        "stride": cell.stride(cand.source)}
                params = {k: v.detach().clone() for k, v in branch.body.state_dict().items()}
                eps = float(over.scales.eps[c].detach())
                args = {"source": cand.source, "op": cand.op}
                plan.branches.append(NewBranch(_renamed(node_name, afters), spec, args, params, eps))
            if cand.kind == "normal":
                for after in afters:  # the new cells get this round's normal edges too, switched off
                    spec = {"type": "darts_op", "op": cand.op, "stride": 1,
                            "channels": base_cell(model.get_submodule(after)).channels}
                    plan.branches.append(NewBranch(f"{after}.1.body.cell.nodes.{cand.node - 2}", spec,
                                                   {"source": cand.source, "op": cand.op}, {}, 0.0))
        return plan, copies


def _one_sample(model: DartsNetwork) -> torch.Tensor:
    size = base_cell(model.cells[0]).input_size
    return torch.zeros(1, model.stem[0].in_channels, size, size, device=next(model.parameters()).device)


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
