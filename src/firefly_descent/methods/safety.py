"""Every growth step is checked: a plan is applied, the model is made ready to train, and the loss on
held-out growth batches decides whether the step stays, is shrunk, or is taken back.

Why: a growth method predicts a loss change from first-order scores read on the data it decided
with. Far from amplitude 0 those predictions can be wrong by orders of magnitude (a Firefly step on a
ResNet predicted -2.8 nats and raised the loss by +1.8). So after `apply`:

1. the new BatchNorm channels are calibrated and all running statistics refreshed on the decision
   batches (`engine.prepare_batchnorm`): the model is in the state training continues from
   (the running statistics are also refreshed before the method decides: `settle_batchnorm`);
2. the loss on `check_batches` batches that no decision saw is measured in eval mode and in train
   mode (batch statistics, running statistics untouched, the same dropout masks before and after);
3. with ``amplitude="line-search"`` the plan's amplitude (split steps, new units' outgoing weights,
   new layers' scales; `Plan.scaled`) is first chosen among `line_search` values by the train-mode
   held-out loss; with ``"step-one"`` the method's own amplitude (1) is tried first;
4. if a mode's loss rose by more than ``tolerance`` (relative, plus `abs_tolerance`), smaller
   amplitudes are tried in turn (`shrink`); if none passes, the plan is undone through the engine
   (`engine.apply_undoable`) and the model, optimizer and BatchNorm statistics are exactly as before.

Function-preserving plans are checked too: their held-out loss must not move beyond the tolerance.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.rules import batchnorms
from ..analysis.trace import as_input_tuple
from ..budget import count_params
from ..collective import current_sync
from ..cost import flop_profile
from ..engine import apply_undoable, growth_history, prepare_batchnorm, refresh_batchnorm
from ..errors import GrowthError
from ..plan import Plan
from .report import GrowthReport, LossFn, Timer

AMPLITUDE_MODES = ("step-one", "line-search")


@dataclass
class Safeguard:
    """How a grower checks its step (see module docstring). `Grower(..., safeguard={...})` or
    `make_grower(name, check=False, amplitude="line-search", ...)` set it."""

    check: bool = True  # measure held-out loss after the step; shrink or undo when it rose
    check_batches: int = 4  # held-out growth batches (drawn after the decision's batches)
    tolerance: float = 0.01  # allowed relative rise of the held-out loss (each mode)
    abs_tolerance: float = 1e-3  # plus this many nats
    amplitude: str = "step-one"  # step-one | line-search
    line_search: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0, 1.5)
    shrink: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625)  # fractions of the chosen amplitude tried on failure
    calibrate_new_bn: bool = True  # new BatchNorm channels: train mode computes what eval mode scored
    refresh_bn: bool = True  # refresh every BatchNorm's running statistics before deciding and after growth
    bn_batches: int | None = 4  # decision batches used for that (None = all of them)
    # also measure eval mode with the old running statistics after growth (the mode BatchNorm-frozen methods
    # predict in; `GrowthReport.heldout_predicted_mode_change`): one more held-out pass of the grown model,
    # for analysis only (no decision reads it), so off by default
    predicted_mode: bool = False

    def __post_init__(self) -> None:
        if self.amplitude not in AMPLITUDE_MODES:
            raise GrowthError(f"amplitude must be one of {', '.join(AMPLITUDE_MODES)}, not {self.amplitude!r}")
        if self.check_batches < 1:
            raise GrowthError(f"check_batches must be >= 1, not {self.check_batches}")
        if self.tolerance < 0 or self.abs_tolerance < 0:
            raise GrowthError("tolerance and abs_tolerance must be >= 0")
        self.line_search = tuple(float(a) for a in self.line_search)
        self.shrink = tuple(float(a) for a in self.shrink)
        if not self.line_search or any(a <= 0 for a in self.line_search + self.shrink):
            raise GrowthError("line_search and shrink amplitudes must be positive numbers")

    @classmethod
    def parse(cls, value: Safeguard | dict[str, Any] | None) -> Safeguard:
        if value is None:
            return cls()
        if isinstance(value, Safeguard):
            return value
        if not isinstance(value, dict):
            raise GrowthError(f"safeguard must be a dict of options, not {type(value).__name__}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise GrowthError(
                f"unknown safeguard option(s) {sorted(unknown)}; known: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**value)

    def allows(self, before: float, after: float) -> bool:
        return math.isfinite(after) and after <= before + self.tolerance * abs(before) + self.abs_tolerance


SAFEGUARD_KEYS = tuple(Safeguard.__dataclass_fields__)


class GrowthData:
    """One pass over the growth data, handed out in disjoint draws: the decision's batches first, then
    the held-out batches the safeguard checks on. A draw (of n batches, or of "everything" when n is None)
    holds back the last `reserve` batches for the check when at least twice as many remain (else the check
    reuses the decision's batches and says so). Wrapping is idempotent."""

    def __init__(self, data: Iterable[Any], reserve: int = 0) -> None:
        if data is None:
            raise GrowthError("a grower needs data: pass an iterable of (inputs, targets) batches, e.g. a DataLoader")
        self._it: Iterator[Any] = iter(data)
        self._held: list[Any] = []
        self.reserve = int(reserve)
        self.drawn = 0

    @classmethod
    def of(cls, data: Any, reserve: int = 0) -> GrowthData:
        return data if isinstance(data, GrowthData) else cls(data, reserve)

    def draw(self, n: int | None, device: torch.device) -> list[tuple[Any, Any]]:
        """Up to `n` further (inputs, targets) batches on `device` (all that remain, less the reserve,
        when n is None)."""
        if n is None:
            rest = self._held + list(self._it)
            k = self.reserve if len(rest) >= 2 * self.reserve else 0  # too little data: the check reuses it
            raw, self._held = rest[: len(rest) - k], rest[len(rest) - k :]
        else:  # n batches, unless that would eat into the reserve
            need = n + self.reserve
            self._held += list(itertools.islice(self._it, max(0, need - len(self._held))))
            k = n if len(self._held) >= need or len(self._held) < 2 * self.reserve else len(self._held) - self.reserve
            raw, self._held = self._held[:k], self._held[k:]
        out = []
        for batch in raw:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise GrowthError("growth data must yield (inputs, targets) pairs")
            x, y = batch[0], batch[1]
            x = x.to(device) if isinstance(x, torch.Tensor) else tuple(t.to(device) for t in x)
            out.append((x, y.to(device)))
        self.drawn += len(out)
        return out


def _norm_buffers(model: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    return [
        (m._buffers, k, b.clone())
        for m in batchnorms(model)
        for k, b in m._buffers.items()
        if b is not None
    ]


_MEMO: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], tuple[list[Any], float]]] = (
    weakref.WeakKeyDictionary()
)
FORWARDS = {"measured": 0, "reused": 0}  # held-out loss passes run and answered from the memo (read by tests)


def _inputs_of(model: nn.Module, batches: list[tuple[Any, Any]]) -> list[torch.Tensor]:
    """Every tensor a held-out loss reads: the model's parameters and buffers, the batches' tensors."""
    data = [t for x, y in batches for t in (*as_input_tuple(x), y)]
    return [*model.parameters(), *model.buffers(), *data]


@torch.no_grad()
def heldout_loss(
    model: nn.Module, batches: list[tuple[Any, Any]], loss_fn: LossFn, train: bool, seed: int = 0
) -> float:
    """Mean loss over `batches` in eval mode, or in train mode (BatchNorm on batch statistics, dropout
    with masks fixed by `seed`) without changing any running statistic.

    The same pass is not run twice: when the model's tensors and the batches' are the same objects, none
    changed in place since (version counters), and loss, mode and seed agree (e.g. eval mode after a
    BatchNorm refresh that found no BatchNorm), the number that pass gave is returned. Single process
    only (ranks must run the same collectives)."""
    memo = _MEMO.setdefault(model, {}) if current_sync().world_size == 1 else None
    try:
        loss_ref = weakref.ref(loss_fn)
    except TypeError:  # a callable that cannot be referenced weakly cannot be told from a later one
        memo = None
    tensors = _inputs_of(model, batches) if memo is not None else []
    key = (train, seed, id(loss_fn), tuple((id(t), t._version) for t in tensors))
    hit = memo.get(key) if memo is not None else None
    if hit is not None and hit[0][0]() is loss_fn and all(r() is t for r, t in zip(hit[0][1:], tensors)):
        FORWARDS["reused"] += 1  # the same objects (not ids reused after others were freed), unchanged
        return hit[1]
    FORWARDS["measured"] += 1
    was = model.training
    saved = _norm_buffers(model) if train else []
    model.train(train)
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for x, y in batches:
                n = int(y.shape[0])
                total += float(loss_fn(model(*as_input_tuple(x)), y)) * n
                count += n
        total, count = current_sync().sum_floats(total, count)  # every rank's shard (identity in one process)
    finally:
        for store, k, v in saved:
            store[k].copy_(v)
        model.train(was)
    value = total / max(1, count)
    if memo is not None:
        if len(memo) >= 8:
            memo.pop(next(iter(memo)))
        memo[key] = ([loss_ref, *(weakref.ref(t) for t in tensors)], value)
    return value


@dataclass
class _Trial:
    amplitude: float
    eval: float  # eval mode after the running statistics were refreshed
    train: float  # train mode (batch statistics)
    eval_stale: float = math.nan  # eval mode before the refresh (new channels calibrated, old statistics)


@dataclass
class SafetyRecord:
    """What the safeguard measured and did; stored in `GrowthReport.safety`."""

    outcome: str  # accepted | shrunk | rolled-back | unchecked | empty
    amplitude: float | None
    heldout_before: dict[str, float] = field(default_factory=dict)
    heldout_after: dict[str, float] = field(default_factory=dict)
    trials: list[dict[str, float]] = field(default_factory=list)
    check_batches: int = 0
    check_data: str = "held-out"
    tolerance: float = 0.0
    batchnorm: dict[str, int] = field(default_factory=dict)


def commit(
    model: nn.Module,
    plan: Plan,
    report: GrowthReport,
    x: tuple[torch.Tensor, ...],
    optimizer: torch.optim.Optimizer | None,
    loss_fn: LossFn,
    data: GrowthData,
    decision_batches: list[tuple[Any, Any]],
    guard: Safeguard,
    finalize: Callable[[], Any] | None = None,
    settled: bool = False,
) -> None:
    """Apply `plan` under `guard` and record in `report` what changed and what the check measured.
    `finalize` runs right after each application (before BatchNorm preparation); with it (or with a plan
    that sets tensor values, `Plan.values`) the step is tried at amplitude 1 only, then kept or undone.
    `settled`: the grower already refreshed the running statistics on these decision batches
    (`settle_batchnorm`), so eval mode before growth needs no refresh."""
    record = SafetyRecord(outcome="unchecked", amplitude=1.0, tolerance=guard.tolerance)
    report.safety = record
    if plan.is_empty():
        record.outcome, record.amplitude = "empty", None
        _record_structure(model, plan, report, x, kept=False)
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    bn_batches = decision_batches[: guard.bn_batches] if guard.bn_batches else decision_batches
    check: list[tuple[Any, Any]] = []
    if guard.check:
        check = data.draw(guard.check_batches, device)
        if not check:
            check, record.check_data = decision_batches, "decision batches (no held-out growth batches left)"
        record.check_batches = len(check)
        with Timer(report.timings, "check"):
            record.heldout_before = {
                "train": heldout_loss(model, check, loss_fn, True),
                "eval_stale": heldout_loss(model, check, loss_fn, False),
            }
            # eval mode compared fairly: the model before growth with its running statistics refreshed on
            # the same batches as the grown one will be (restored afterwards), so only the growth differs
            record.heldout_before["eval"] = (
                record.heldout_before["eval_stale"]
                if settled or not guard.refresh_bn
                else _eval_refreshed(model, check, bn_batches, loss_fn, guard)
            )
    since = len(growth_history(model))
    tried: dict[float, _Trial] = {}

    def attempt(amplitude: float, full: bool = True) -> tuple[Any, _Trial | None]:
        """Apply at `amplitude`; calibrate new BatchNorm channels; measure train mode; only if that
        passes, refresh running statistics and measure eval mode (a failed trial costs no refresh)."""
        with Timer(report.timings, "apply"):
            undo = apply_undoable(model, plan if amplitude == 1.0 else plan.scaled(amplitude), optimizer, x)
            if finalize is not None:
                finalize()
        bn: dict[str, int] = {}
        if guard.calibrate_new_bn:
            with Timer(report.timings, "batchnorm"):
                bn = prepare_batchnorm(model, bn_batches, since, refresh=False)
        if not guard.check:
            if guard.refresh_bn:
                with Timer(report.timings, "batchnorm"):
                    bn["refreshed_layers"] = refresh_batchnorm(model, bn_batches)
            record.batchnorm = bn
            return undo, None
        with Timer(report.timings, "check"):
            t = _Trial(amplitude, math.nan, heldout_loss(model, check, loss_fn, True))
            if full and guard.predicted_mode:  # eval mode, old running statistics: what the methods predict
                t.eval_stale = heldout_loss(model, check, loss_fn, False)
        if full and guard.allows(record.heldout_before["train"], t.train):
            if guard.refresh_bn:
                with Timer(report.timings, "batchnorm"):
                    bn["refreshed_layers"] = refresh_batchnorm(model, bn_batches)
            with Timer(report.timings, "check"):
                t.eval = heldout_loss(model, check, loss_fn, False)
        record.batchnorm = bn
        tried[amplitude] = t
        record.trials.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(t).items()})
        return undo, t

    def passes(t: _Trial) -> bool:
        b = record.heldout_before
        return guard.allows(b["train"], t.train) and guard.allows(b["eval"], t.eval)

    start = 1.0
    fixed = finalize is not None or bool(plan.values)  # a step with fixed values is kept or undone, never scaled
    if guard.check and guard.amplitude == "line-search" and not fixed:
        for a in guard.line_search:
            undo, t = attempt(a, full=False)  # train mode only: the mode training continues in
            undo()
        start = min(tried.values(), key=lambda t: (t.train, -t.amplitude)).amplitude
    ladder = [start] + ([start * f for f in guard.shrink] if not fixed else [])
    for i, a in enumerate(ladder):
        undo, t = attempt(a)
        if t is None or passes(t):
            record.amplitude = a
            if t is not None:
                record.outcome = "accepted" if i == 0 else "shrunk"
                record.heldout_after = {"eval": t.eval, "train": t.train}
                if guard.predicted_mode:
                    record.heldout_after["eval_stale"] = t.eval_stale
            _record_structure(model, plan, report, x, kept=True)
            return
        undo()
    record.outcome, record.amplitude = "rolled-back", None
    record.heldout_after = dict(record.heldout_before)
    _record_structure(model, plan, report, x, kept=False)


def settle_batchnorm(model: nn.Module, batches: list[Any], guard: Safeguard | None) -> int:
    """Before deciding: refresh the running statistics on the decision batches, so that eval mode (in which
    growth methods score candidates, BatchNorm frozen) computes what train mode does. With stale statistics
    a method's step one learns to undo the mismatch, a gain that vanishes at the next refresh."""
    guard = Safeguard.parse(guard)
    if not guard.refresh_bn:
        return 0
    return refresh_batchnorm(model, batches[: guard.bn_batches] if guard.bn_batches else batches)


def _eval_refreshed(
    model: nn.Module, check: list[Any], bn_batches: list[Any], loss_fn: LossFn, guard: Safeguard
) -> float:
    """Eval-mode loss with every BatchNorm's running statistics refreshed on `bn_batches`, then restored."""
    if not guard.refresh_bn:
        return heldout_loss(model, check, loss_fn, False)
    saved = _norm_buffers(model)
    try:
        refresh_batchnorm(model, bn_batches)
        return heldout_loss(model, check, loss_fn, False)
    finally:
        with torch.no_grad():
            for store, k, v in saved:
                store[k].copy_(v)


def _record_structure(
    model: nn.Module, plan: Plan, report: GrowthReport, x: tuple[torch.Tensor, ...], kept: bool
) -> None:
    """Fill in what the applied plan changed (nothing when it was not kept)."""
    if kept:
        for c in plan.changes:
            name = c.group.name
            if c.splits:
                report.units_split[name] = report.units_split.get(name, 0) + len(c.splits)
            if c.new is not None and c.new.count:
                report.units_added[name] = report.units_added.get(name, 0) + c.new.count
        report.layers_inserted += [layer.after for layer in plan.layers]
    elif not plan.is_empty():
        report.extra["undone_plan"] = plan.explain()
    report.widths_after = {
        name: w + report.units_split.get(name, 0) + report.units_added.get(name, 0)
        for name, w in report.widths_before.items()
    }
    report.params_after = count_params(model)
    # counted once for the step (a model left as it was hits the count `flops_before` made); the training
    # loop reads it from the report instead of counting again
    report.flops_after = flop_profile(model, x).total
