"""Firefly descent on DARTS cells: new edges, wider cells and new cells compete in one selection.

Candidates: a new edge ε·o(x_j) into node i of every cell of a type (shared, as DARTS shares its
genotype); a wider cell type (new units in every channel group produced inside its cells, so each cell
keeps one width); a new normal cell in residual form after a normal cell (z + ε·cell(z, z)). Each kind
gets an over-grown copy built by the engine at zero (verified exact; methods/cellsearch/overgrown.py) whose
candidates are scaled by a shared ε_c times a gate (α + g_c) (for widening: the new weight entries times the
gate). Step one trains the candidates with old weights and BatchNorm statistics frozen (eval mode). Step two
integrates ∂L/∂g_c along α ∈ (0, 1] (midpoint rule), which sums over the cells a candidate changes:
s_c ≈ L(with c) - L(without), to first order in the other candidates of its copy. One greedy selection over
all kinds by score per cost under a parameter or FLOP budget; the kept candidates become one `Plan` (width
changes with their trained values, `NewLayer`s, `NewBranch`es with their trained weights) that the `Grower`
template commits through the safeguard (engine.apply, held-out check, undone as a whole if the loss rose).
New BatchNorms are calibrated so that train mode computes what eval mode scored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from ...analysis.rules import is_batchnorm
from ...budget import count_flops
from ...engine import calibrate_new_batchnorm, plan_edits
from ...errors import GrowthError
from ...layers import build_body
from ...models.darts import DartsNetwork, base_cell, cell_paths
from ...plan import NewBranch, NewLayer, Plan
from ..base import Context, Decision, Grower, GrowthReport, LossFn
from ..safety import GrowthData, Safeguard
from .overgrown import (  # noqa: F401  (re-exported: the over-grown copies' old import path)
    CellCandidate,
    OvergrownCells,
    WidenCandidate,
    batches_on,
    branch_plan,
    build_overgrown,
    build_overgrown_cells,
    build_widened,
    candidate_cells,
    cell_layer_spec,
    integrated_scores,
    renamed,
    split_name,
    train_widened,
    widen_plan,
)
from .space import SEARCH_OPS, EdgeCandidate, candidate_cost, candidate_edges, cells_of

CellSearchCandidate = EdgeCandidate | WidenCandidate | CellCandidate  # one growth option of a round
KINDS_OF_GROWTH = ("edges", "widen", "cells")
RANKS = ("efficiency", "score")


@dataclass
class CellGrowthReport(GrowthReport):
    """A `GrowthReport` with what a round of cell growth weighed: the candidates, their scores, the kept ones
    and their costs, the kinds that could not be built and why, and the selected ones the safeguard undid."""

    candidates: int = 0
    kept: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # candidate kinds that could not be built, and why
    undone: list[str] = field(default_factory=list)  # selected, but the safeguard took the step back


class FireflyCells(Grower):
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
    A `Grower` on the common template: `decide` is the round (candidates, step one, step two, selection),
    and its plan (widened tensors' trained values included, `Plan.values`) is applied by the engine.
    """

    name = "firefly-cells"
    report_type = CellGrowthReport
    example_samples = 2

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
        for x, y in batches_on(loader, self.step_one_batches, sc.eps.device):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
            with torch.no_grad():
                sc.eps.clamp_(-self.eps_max, self.eps_max)

    def select(self, model: DartsNetwork, cands: list[CellSearchCandidate], scores: torch.Tensor,
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

    def _cost(self, model: DartsNetwork, cand: CellSearchCandidate, over: nn.Module | None = None) -> float:
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

    # ---- the template's hooks (methods/base.py: Grower.grow) ---------------------------------------
    def begin(
        self, model: nn.Module, data: Iterable[Any], loss_fn: LossFn, example_inputs: Any = None,
        n_batches: int | None = None,
    ) -> Context:
        if not isinstance(model, DartsNetwork):
            raise GrowthError(f"cell growth needs a DartsNetwork, got {type(model).__name__}")
        return super().begin(model, data, loss_fn, example_inputs, n_batches)

    def draw(self, data: GrowthData, device: torch.device, n: int | None = None) -> tuple[list[Any], list[Any]]:
        """The round's batches, and the first `score_batches` of them: the same batches for the loss before,
        the scores and the loss after (a paired measurement)."""
        if n is None and self.step_one_batches is not None and self.score_batches is not None:
            n = max(self.step_one_batches, self.score_batches, self.calibrate_batches)
        decision = data.draw(n, device)
        if not decision:
            raise GrowthError("cell growth needs at least one batch of growth data")
        return decision, decision[: self.score_batches] if self.score_batches else decision

    # ---- the decision: candidates of every kind, step one, step two, one selection ----------------
    def decide(self, ctx: Context) -> Decision:
        """One Firefly round: candidates of every kind, step one, step two, one selection, one plan."""
        model, loss_fn, decision, report = ctx.model, ctx.loss_fn, ctx.batches, ctx.report
        assert isinstance(model, DartsNetwork) and isinstance(report, CellGrowthReport)
        fixed = ctx.loss_batches or decision
        example_inputs = ctx.x[0]
        cands: list[CellSearchCandidate] = []
        scores: list[float] = []
        costs: list[float] = []
        refused: dict[str, str] = {}
        found: dict[CellSearchCandidate, tuple[OvergrownCells, int]] = {}
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
                train_widened(over, masks, decision[: self.step_one_batches] if self.step_one_batches else decision,
                              loss_fn, self.lr)
                s = integrated_scores(over, fixed, loss_fn, self.points)
                cands.append(wc)
                scores.append(float(s[0]))
                costs.append(self._cost(model, wc, over.net))
                widened[wc] = (plan, over, masks)
        report.candidates, report.refused = len(cands), refused
        if not cands:
            report.predicted_loss_change = 0.0
            return Decision(Plan(method="firefly-cells"), why_empty="no candidate could be built (see refused)")
        kept = self.select(model, cands, torch.tensor(scores), costs)
        plan = self._plan(model, [cands[c] for c in kept], found, widened)
        report.kept = [str(cands[c]) for c in kept]
        report.scores = {str(c): s for c, s in zip(cands, scores)}
        report.costs = {str(cands[c]): costs[c] for c in kept}
        report.predicted_loss_change = float(sum(scores[c] for c in kept))
        names_before = {name for name, _ in model.named_modules()}

        def calibrate() -> None:
            """New operations' and cells' BatchNorms: train mode computes what eval mode scored."""
            with torch.no_grad():
                channels = {
                    name: list(range(m.num_features)) for name, m in model.named_modules()
                    if name not in names_before and is_batchnorm(m) and m.affine
                }
                xs = [x for x, _ in decision[: self.calibrate_batches]]
                if channels:
                    calibrate_new_batchnorm(model, channels, xs)

        return Decision(plan, finalize=calibrate, why_empty="no candidate lowered the loss within the budget")

    def finish(self, ctx: Context, decision: Decision) -> GrowthReport:
        report = super().finish(ctx, decision)
        assert isinstance(report, CellGrowthReport)
        if report.outcome == "rolled-back":
            report.kept, report.undone = [], report.kept
        return report

    def _plan(
        self, model: DartsNetwork, kept: list[CellSearchCandidate], found: dict[Any, tuple[OvergrownCells, int]],
        widened: dict[WidenCandidate, tuple[Plan, OvergrownCells, dict[str, torch.Tensor]]],
    ) -> Plan:
        """One plan for every kept candidate, with its trained weights: width changes (the widened tensors'
        trained values in `Plan.values`), new cells (kept new normal edges enter them too, at scale 0, so all
        normal cells share one genotype) and new edges."""
        plan = Plan(method="firefly-cells", function_preserving=False)
        copies: dict[str, torch.Tensor] = {}
        for cand in kept:
            if isinstance(cand, WidenCandidate):
                wplan, over, masks = widened[cand]
                plan.changes += wplan.changes
                for name, module in over.branches[0]:
                    parametrize.remove_parametrizations(module, split_name(name)[1], leave_parametrized=True)
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
                plan.branches.append(NewBranch(renamed(node_name, afters), spec, args, params, eps))
            if cand.kind == "normal":
                for after in afters:  # the new cells get this round's normal edges too, switched off
                    spec = {"type": "darts_op", "op": cand.op, "stride": 1,
                            "channels": base_cell(model.get_submodule(after)).channels}
                    plan.branches.append(NewBranch(f"{after}.1.body.cell.nodes.{cand.node - 2}", spec,
                                                   {"source": cand.source, "op": cand.op}, {}, 0.0))
        plan.values = {renamed(name, afters): value for name, value in copies.items()}
        return plan


def _one_sample(model: DartsNetwork) -> torch.Tensor:
    size = base_cell(model.cells[0]).input_size
    return torch.zeros(1, model.stem[0].in_channels, size, size, device=next(model.parameters()).device)
