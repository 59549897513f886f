"""The one interface every growth method implements, and the template that runs a growth step.

A `Grower` only *decides* what to grow: `grow` is a template that opens the step (device, batches,
BatchNorm settled, analysis, report started, loss before), asks the method's `decide(ctx)` for a `Plan`,
commits the plan through the safeguard (methods/safety.py: applied by the engine, checked, shrunk or
undone) and finishes the report (loss after, skipped groups, why an empty step is empty). A method
writes only its decision; a grower that needs a different step may still override `grow` itself.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis import GrowthGraph, analyze
from ..analysis.graph import Group
from ..analysis.trace import as_input_tuple as as_inputs
from ..budget import Budget, count_params
from ..cost import flop_profile
from ..engine import growth_history
from ..errors import GrowthError
from ..plan import Plan
from .report import GrowthReport, LossFn, Timer
from .safety import SAFEGUARD_KEYS, GrowthData, Safeguard, commit, heldout_loss, settle_batchnorm

__all__ = [
    "Decision",
    "Grower",
    "Context",
    "GrowthReport",
    "LossFn",
    "Timer",
    "as_inputs",
    "available_growers",
    "example_from",
    "make_grower",
    "mean_loss",
    "model_device",
    "register_grower",
    "start_report",
    "take_batches",
]


# ---- the pieces of a step's opening --------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def take_batches(data: Iterable[Any], n: int | None, device: torch.device) -> list[tuple[Any, Any]]:
    """The next `n` (inputs, targets) batches of `data` (all when n is None), moved to `device`.

    Pass a `GrowthData` to draw disjoint batches in turn (decision, then the safeguard's check)."""
    batches = GrowthData.of(data).draw(n, device)
    if not batches:
        raise GrowthError("growth data is empty")
    return batches


def example_from(batches: list[tuple[Any, Any]], example_inputs: Any, n: int = 4) -> tuple[torch.Tensor, ...]:
    """Example inputs for analysis and verification: the given ones, else a slice of the first batch."""
    if example_inputs is not None:
        return as_inputs(example_inputs)
    return tuple(t[:n] for t in as_inputs(batches[0][0]))


def _first_loss(model: nn.Module, batches: list[Any], loss_fn: LossFn) -> float:
    """`mean_loss` where a loss function that does not fit the data (wrong arity, a shape mismatch, a non-scalar
    result) is said in one line, before the step has changed anything."""
    try:
        return mean_loss(model, batches, loss_fn)
    except (TypeError, ValueError, RuntimeError) as e:
        first = " ".join(str(e).split())[:200]
        raise GrowthError(
            f"the loss before growth could not be computed ({type(e).__name__}: {first}); growth data must yield "
            "(inputs, targets) and loss_fn(model(inputs), targets) must return a scalar tensor"
        ) from e


def mean_loss(model: nn.Module, batches: list[tuple[Any, Any]], loss_fn: LossFn) -> float:
    """Average loss over `batches` in eval mode (BatchNorm statistics frozen), no graph kept."""
    return heldout_loss(model, batches, loss_fn, train=False)


def start_report(
    method: str,
    model: nn.Module,
    graph: GrowthGraph,
    x: tuple[torch.Tensor, ...],
    cls: type[GrowthReport] = GrowthReport,
) -> GrowthReport:
    return cls(
        method=method,
        widths_before={g.name: g.width for g in graph.growable()},
        params_before=count_params(model),
        flops_before=flop_profile(model, x).total,
    )


@dataclass
class Context:
    """Everything a decision reads in one growth step (built by `Grower.begin`)."""

    model: nn.Module
    loss_fn: LossFn
    device: torch.device
    batches: list[tuple[Any, Any]]  # the decision's batches (BatchNorm settled and refreshed on them)
    x: tuple[torch.Tensor, ...]  # example inputs (analysis, verification, FLOPs)
    graph: GrowthGraph
    groups: list[Group]  # growable groups this method may grow
    report: GrowthReport
    gen: torch.Generator
    data: GrowthData | None = None  # the rest of the growth data (the safeguard's held-out batches)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why this method leaves it alone
    loss_batches: list[tuple[Any, Any]] | None = None  # where the loss before/after is read (None: `batches`)
    epoch_batches: int | None = None  # batches in one training epoch, when known (cost limits in epochs)
    bn_refreshed: int = 0  # BatchNorm layers whose running statistics were refreshed before deciding


@dataclass
class Decision:
    """What `decide` returns when a plan is not all: `finalize` runs right after the plan is applied (an
    edit of existing weights that belongs to the step; the step is then checked as one and never scaled),
    `calibrate_new_bn` overrides the safeguard's option for this step, `why_empty` says why the plan is
    empty (printed in the report)."""

    plan: Plan
    finalize: Callable[[], Any] | None = None
    calibrate_new_bn: bool | None = None
    why_empty: str | None = None

    @classmethod
    def of(cls, value: Plan | Decision) -> Decision:
        return value if isinstance(value, Decision) else cls(value)


class Grower:
    """Base class and template of every growth method: subclasses set `name` and implement `decide`.

    `safeguard` says how the step is checked after the plan is applied (methods/safety.py): every
    grower's plan goes through `safety.commit`, which shrinks or undoes a step that raised the held-out
    loss and leaves BatchNorm models ready to train.
    """

    name: str = "grower"
    safeguard: Any = None  # a safety.Safeguard; None = the defaults
    # batches in one training epoch, set by the training loop: growers that size their work to a cost
    # target in epochs read it (None: the growth data's own length, when it has one)
    epoch_batches: int | None = None
    # True: every statistic the decision reads goes through collective.current_sync(), so under
    # torch.distributed each rank may decide on its own shard of the growth data (docs/distributed.md)
    sharded_growth: bool = False
    batches: int | None = None  # how many batches of the growth data the decision reads (None = all)
    seed: int = 0  # all randomness of a decision derives from it (and the model's growth-step count)
    group_names: list[str] | None = None  # grow only these groups (None: every growable group)
    last_plan: Plan | None = None  # the plan of the last step (inspection, tests, logging)
    report_type: type[GrowthReport] = GrowthReport  # a method whose report carries fields of its own subclasses it
    example_samples: int = 4  # samples of the first batch used as example inputs when none are given
    # submodules the analysis treats as opaque (`analyze(exclude=...)`): their units do not grow, and code inside
    # them that cannot be traced (data-dependent control flow) no longer stops the analysis; `make_grower(...,
    # exclude=[...])`, `growth.kwargs.exclude` in a config
    exclude: list[str] | None = None

    def set_safeguard(self, **options: Any) -> Grower:
        """Override safeguard options, e.g. `grower.set_safeguard(amplitude="line-search")`."""
        current = self.safeguard if self.safeguard is not None else Safeguard()
        self.safeguard = Safeguard(**{**asdict(current), **options})
        return self

    # ---- the template ------------------------------------------------------------------------------
    def grow(
        self,
        model: nn.Module,
        data: Iterable[tuple[torch.Tensor, torch.Tensor]],
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
    ) -> GrowthReport:
        """Grow `model` in place (remapping `optimizer` if given) and report what was done."""
        was = model.training
        ctx = self.begin(model, data, loss_fn, example_inputs)
        decision = Decision.of(self.decide(ctx))
        self.commit(ctx, decision, optimizer)
        model.train(was)
        return self.finish(ctx, decision)

    def decide(self, ctx: Context) -> Plan | Decision:
        """The method itself: read `ctx` (batches, graph, groups, generator), write report fields it
        measures into `ctx.report`, and return the plan (or a `Decision`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement decide(ctx) or override grow()")

    def begin(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFn,
        example_inputs: Any = None,
        n_batches: int | None = None,
    ) -> Context:
        """Draw the decision's batches, settle BatchNorm on them, analyse the model, start the report,
        measure the loss before growth and seed the generator."""
        if not callable(loss_fn):
            raise GrowthError(
                f"loss_fn must be a callable loss(outputs, targets) -> scalar tensor (e.g. "
                f"torch.nn.functional.cross_entropy), not {type(loss_fn).__name__} {loss_fn!r:.40}"
            )
        device = model_device(model)
        guard = Safeguard.parse(self.safeguard)
        epoch = self.epoch_batches or (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
        data = GrowthData.of(data, reserve=guard.check_batches if guard.check else 0)
        timings: dict[str, float] = {}
        with Timer(timings, "analyze"):
            batches, loss_batches = self.draw(data, device, n_batches)
            refreshed = settle_batchnorm(model, batches, guard)
            x = tuple(t.to(device) for t in example_from(batches, example_inputs, self.example_samples))
            graph = analyze(model, x, exclude=self.exclude)
        skipped: dict[str, str] = {}
        groups = self.select_groups(graph, model, skipped)
        report = start_report(self.report_name(), model, graph, x, self.report_type)
        report.timings.update(timings)
        with Timer(report.timings, "eval"):
            report.loss_before = _first_loss(model, loss_batches, loss_fn)
        gen = self.generator(model)
        return Context(model, loss_fn, device, batches, x, graph, groups, report, gen, data, skipped,
                             loss_batches, epoch, refreshed)

    def draw(self, data: GrowthData, device: torch.device, n: int | None = None) -> tuple[list[Any], list[Any]]:
        """The decision's batches and the batches the loss before and after growth is read on."""
        batches = take_batches(data, self.batches if n is None else n, device)
        return batches, batches

    def select_groups(self, graph: GrowthGraph, model: nn.Module, skipped: dict[str, str]) -> list[Group]:
        """The growable groups this method may grow (`group_names` when given: unknown or blocked names
        raise, and groups grown only on request count when named); groups it leaves alone go into `skipped`
        with the reason."""
        if self.group_names is None:
            return graph.growable()
        names = {graph[n].name for n in self.group_names}  # a merged-away name finds its group
        for n in names:
            graph[n].check_growable()
        return [g for g in graph.growable(on_request=True) if g.name in names]

    def report_name(self) -> str:
        return self.name

    def generator(self, model: nn.Module) -> torch.Generator:
        """Seeded by `seed` and the model's growth-step count: a resumed run draws what an uninterrupted one
        would."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + len(growth_history(model)))

    def commit(self, ctx: Context, decision: Decision, optimizer: torch.optim.Optimizer | None) -> None:
        """Apply the decision's plan through the engine under the grower's safeguard (check, shrink or undo,
        BatchNorm made ready to train) and record what it changed in the report."""
        guard = Safeguard.parse(self.safeguard)
        if decision.calibrate_new_bn is not None and decision.calibrate_new_bn != guard.calibrate_new_bn:
            guard = dataclasses.replace(guard, calibrate_new_bn=decision.calibrate_new_bn)
        self.last_plan = decision.plan
        assert ctx.data is not None
        # BatchNorm was settled on the decision batches in `begin` (safety.settle_batchnorm)
        commit(ctx.model, decision.plan, ctx.report, ctx.x, optimizer, ctx.loss_fn, ctx.data, ctx.batches, guard,
               decision.finalize, settled=True)

    def finish(self, ctx: Context, decision: Decision) -> GrowthReport:
        """The loss after growth, the groups left alone and why, and why an empty step is empty."""
        report = ctx.report
        with Timer(report.timings, "eval"):
            report.loss_after = mean_loss(ctx.model, ctx.loss_batches or ctx.batches, ctx.loss_fn)
        if ctx.skipped:
            report.extra["skipped_groups"] = dict(ctx.skipped)
        if report.outcome == "empty":
            report.extra["empty_reason"] = decision.why_empty or self._why_empty(ctx)
        return report

    def _why_empty(self, ctx: Context) -> str:
        if not ctx.groups:
            return "no growable group (see the analysis: print(ff.analyze(model, x)))"
        if ctx.skipped and set(ctx.skipped) >= {g.name for g in ctx.groups}:
            return f"{self.name} skipped every growable group (reasons below)"
        return "no candidate was kept (none lowered the loss, or none fit the budget)"

    # ---- budgets -----------------------------------------------------------------------------------
    def use_group_pools(self) -> Grower:
        """Give every group its own budget pool (`per_group=True`, budget.Budget.group_limit)."""
        budget = getattr(self, "budget", None)
        if not isinstance(budget, Budget):
            raise GrowthError(f"grower {self.name!r} has no per-layer budget pools: per_group is not an option of it")
        self.budget = dataclasses.replace(budget, per_group=True)
        return self


_REGISTRY: dict[str, Callable[..., Grower]] = {}


def register_grower(name: str) -> Callable[[Callable[..., Grower]], Callable[..., Grower]]:
    """Class decorator: make a grower constructible by name (CLI, configs, benchmarks)."""

    def deco(cls: Callable[..., Grower]) -> Callable[..., Grower]:
        _REGISTRY[name] = cls
        return cls

    return deco


def make_grower(name: str, **kwargs: Any) -> Grower:
    """Build a registered grower by name, e.g. `make_grower("firefly", budget=0.35)`; `per_group=True` gives
    every group its own budget pool, for any grower with a `Budget`; `exclude=[names]` keeps those submodules
    out of the analysis (opaque, not grown)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown grower {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    own = getattr(cls, "own_safeguard_keys", ())  # options a grower takes itself (Firefly's amplitude)
    safety = {k: kwargs.pop(k) for k in list(kwargs) if k in SAFEGUARD_KEYS and k not in own}
    per_group = False
    if "per_group" in kwargs and "per_group" not in _parameters(cls):
        per_group = bool(kwargs.pop("per_group"))
    exclude = kwargs.pop("exclude", None) if "exclude" not in _parameters(cls) else None
    if exclude is not None and (isinstance(exclude, str) or not all(isinstance(n, str) for n in exclude)):
        raise GrowthError(f"exclude must be a list of submodule names, not {exclude!r}")
    grower = cls(**kwargs)
    if per_group:
        grower.use_group_pools()
    if exclude is not None:
        grower.exclude = list(exclude)
    if safety:
        grower.set_safeguard(**safety)
    return grower


def _parameters(cls: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def available_growers() -> list[str]:
    return sorted(_REGISTRY)


def grower_takes(name: str, option: str) -> bool:
    """Whether the grower registered as `name` takes keyword `option` itself (the loop passes its seed
    only to growers that take one)."""
    factory = _REGISTRY.get(name)
    return factory is not None and option in _parameters(factory)
