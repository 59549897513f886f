"""The over-grown copies Firefly cell growth trains and scores: new edges, wider cell types and new cells.

Each kind of candidate gets a copy of the model built by the engine at zero (verified exact) whose
candidates are scaled by a shared ε_c times a gate (α + g_c) (for a widening: the new weight entries times
the gate), so that ∂L/∂g_c scores candidate c (`integrated_scores`). `methods.cellsearch.firefly_cells`
runs the search over them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from ...analysis import analyze
from ...engine import apply
from ...errors import GrowthError, VerificationError
from ...models.darts import Cell, DartsNetwork, Node, base_cell, cell_paths
from ...plan import GroupChange, NewBranch, NewLayer, NewUnits, Plan
from ..report import LossFn
from .space import EdgeCandidate, cells_of


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


def batches_on(
    loader: Iterable[Any], n: int | None, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` batches of `loader` (all when None) on `device`."""
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
    for x, y in batches_on(loader, batches, device):
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


def split_name(name: str) -> tuple[str, str]:
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
        mod_name, attr = split_name(name)
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


def train_widened(over: OvergrownCells, masks: dict[str, torch.Tensor], batches: list[Any], loss_fn: LossFn,
                   lr: float) -> None:
    """Step one for a widening: train only the new entries (old weights and BatchNorm statistics frozen)."""
    net = over.net
    for p in net.parameters():
        p.requires_grad_(False)
    params = []
    for name, m in masks.items():
        mod_name, attr = split_name(name)
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


def renamed(name: str, afters: list[str]) -> str:
    """A module path after layers were inserted after `afters` (the wrapped module is child 0)."""
    for a in afters:
        if name == a or name.startswith(a + "."):
            return a + ".0" + name[len(a):]
    return name
