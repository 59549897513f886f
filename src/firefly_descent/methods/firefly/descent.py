"""Firefly neural architecture descent (Wu, Liu, Stone, Liu, NeurIPS 2020).

Step one: switch every candidate on (the over-grown network) and optimise the candidates'
directions and scales for a short time, old weights and BatchNorm statistics frozen.
Step two: score each candidate by an integrated gradient of the loss along its scale
(sampled at `score_points`; by default all gates move together along one path, or along each
candidate's own path with the others on, `score_path="per-candidate"`, the paper's s_i), keep
the best under the budget, and materialise them on the original model through the engine.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from ...analysis.rules import completion_reason, is_residual
from ...budget import (
    Budget,
    Candidate,
    count_flops,
    group_unit_costs,
    select,
    unit_param_cost,
)
from ...collective import current_sync
from ...cost import plan_cost
from ...errors import GrowthError
from ...plan import NewLayer, Plan
from ..base import (
    Context,
    Decision,
    Grower,
    GrowthReport,
    LossFn,
    Timer,
    as_inputs,
    register_grower,
    take_batches,
)
from ..safety import GrowthData, Safeguard
from .candidates import WidthCandidates, block_size, build_width_candidates, materialize_width, pool_block, splittable
from .config import CANDIDATE_SETS, PRESETS, SCORE_PATHS, FireflyConfig, midpoints
from .depth import _layer_kind, _widen_body, _widen_copy, default_depth_boundaries, depth_summary, exact_added_params
from .depth_candidates import DepthCandidates, build_depth_candidates
from .scoring import candidate_scores, compare_with_joint, micro_batches, set_mode


def _head(batch: tuple[Any, Any], n: int) -> tuple[Any, Any]:
    """The first `n` samples of an (inputs, targets) batch."""
    xb, yb = batch
    xs = xb[:n] if isinstance(xb, torch.Tensor) else tuple(t[:n] for t in as_inputs(xb))
    return xs, yb[:n]


@register_grower("firefly")
class Firefly(Grower):
    """Firefly descent: grow wider (splits, new units) and/or deeper (new layers) under a budget."""

    name = "firefly"
    sharded_growth = True  # reduces through collective.current_sync(): N ranks, one decision

    def __init__(self, budget: Any = 0.35, preset: str = "default", per_group: bool = False, **overrides: Any):
        if preset not in PRESETS:
            raise GrowthError(f"unknown Firefly preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **overrides}
        unknown = set(values) - set(FireflyConfig.__dataclass_fields__)
        if unknown:
            raise GrowthError(
                f"unknown Firefly option(s) {sorted(unknown)}; known: "
                f"{', '.join(sorted(FireflyConfig.__dataclass_fields__))}"
            )
        self.config = FireflyConfig(**values)
        if self.config.candidates not in CANDIDATE_SETS:
            raise GrowthError(f"candidates must be one of {', '.join(CANDIDATE_SETS)}, not {self.config.candidates!r}")
        if self.config.bn_mode not in ("frozen", "batch"):
            raise GrowthError(f"bn_mode must be 'frozen' or 'batch', not {self.config.bn_mode!r}")
        if self.config.micro_batch is not None and self.config.micro_batch < 1:
            raise GrowthError(f"micro_batch must be a positive sample count or None, not {self.config.micro_batch}")
        if isinstance(self.config.score_points, int):
            self.config.score_points = midpoints(self.config.score_points)
        if not self.config.score_points or any(not 0 <= a <= 1 for a in self.config.score_points):
            raise GrowthError("score_points must be values in [0, 1] (or an int n for n midpoints)")
        if self.config.score_path not in SCORE_PATHS:
            raise GrowthError(f"score_path must be one of {', '.join(SCORE_PATHS)}, not {self.config.score_path!r}")
        n = self.config.per_candidate_points
        if n is not None and (not isinstance(n, int) or n < 1):
            raise GrowthError(f"per_candidate_points must be a positive int or None (exact), not {n!r}")
        if self.config.score_top is not None and not self.config.score_top > 0:
            raise GrowthError(f"score_top must be a count, a fraction > 0 or None, not {self.config.score_top!r}")
        self.budget = Budget.parse(budget)
        if per_group:
            self.budget.per_group = True
        self.preset = preset
        self.last_scores: list[Candidate] = []
        self._joint_scores: dict[str, torch.Tensor] = {}  # per-candidate path: the joint scores, for the report

    # ---- the template's hooks (methods/base.py: Grower.grow) ---------------------------------------
    def draw(self, data: GrowthData, device: torch.device, n: int | None = None) -> tuple[list[Any], list[Any]]:
        """Step one's batches (BatchNorm is settled on them) and step two's, on which the loss before and
        after growth is read."""
        batches, score_batches, self.score_data = self._draw(data, device)
        return batches, score_batches

    def select_groups(self, graph: Any, model: nn.Module, skipped: dict[str, str]) -> list[Any]:
        groups = []
        for g in graph.growable():
            if block_size(g) is None:
                skipped[g.name] = "a GroupNorm/grouped-conv constraint: Firefly has no candidates for it"
            elif completion_reason(g, model) is not None:
                skipped[g.name] = str(completion_reason(g, model))
            elif _tied(g, model):
                skipped[g.name] = f"tensors {' and '.join(_tied(g, model))} are one (tied): no candidates on them"
            else:
                groups.append(g)
        if not groups and self.config.candidates != "depth":
            others = [g.name for g in graph.growable()]
            why = "; ".join(f"{name!r}: {skipped[name]}" for name in others) or "the model has no growable group"
            hint = "; random and net2net can grow them" if others else ""
            raise GrowthError(f"no group Firefly can grow ({why}){hint}")
        return groups

    def report_name(self) -> str:
        return f"firefly[{self.preset}]"

    def generator(self, model: nn.Module) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed)

    # ---- the decision: step one, step two, selection ---------------------------------------------
    def decide(self, ctx: Context) -> Decision:
        cfg = self.config
        self._joint_scores = {}
        model, graph, groups, x, gen, report, loss_fn = (
            ctx.model, ctx.graph, ctx.groups, ctx.x, ctx.gen, ctx.report, ctx.loss_fn
        )
        guard = Safeguard.parse(self.safeguard)
        epoch = ctx.epoch_batches
        batches, score_batches = ctx.batches, ctx.loss_batches or ctx.batches
        report.extra["score_data"] = self.score_data
        report.extra["batchnorm_refreshed_before"] = ctx.bn_refreshed

        use_splits = cfg.candidates in ("width", "splits", "all")
        use_new = cfg.candidates in ("width", "new", "all")
        use_depth = cfg.candidates in ("depth", "all")
        candidates: list[Candidate] = []
        costs = group_unit_costs(self.budget, groups, model, x)
        width_c: WidthCandidates | None = None
        depth_c: DepthCandidates | None = None

        if use_splits or use_new:
            per = {g.name: block_size(g) or 1 for g in groups}  # attention heads: whole heads of per units
            new_count = {
                g.name: per[g.name] * math.ceil(self._new_count(g, groups, costs[g.name]) / per[g.name])
                if use_new
                else 0
                for g in groups
            }
            for g in groups:  # a normalised stream's pool is one candidate (`pool_block`): what the budget affords
                if new_count[g.name] and pool_block(g, new_count[g.name]) == new_count[g.name] > per[g.name]:
                    limit = self.budget.group_limit(g, groups) if self.budget.per_group else self.budget.limit(groups)
                    afford = int(limit / max(costs[g.name], 1e-12)) // per[g.name]
                    new_count[g.name] = per[g.name] * max(1, min(new_count[g.name] // per[g.name], afford))
            report.extra["pool"] = {  # candidates per group against its share of the budget (in units)
                g.name: {
                    "splits": g.width if use_splits and splittable(g) else 0,
                    "new": new_count[g.name],
                    "budget_share": self.budget.group_limit(g, groups) / max(costs[g.name], 1e-12),
                }
                for g in groups
            }
            with Timer(report.timings, "build"):
                width_c = build_width_candidates(
                    model,
                    graph,
                    groups,
                    new_count,
                    use_splits,
                    x,
                    {
                        "split": cfg.init_split,
                        "new_in": cfg.init_new_in,
                        "new_out": cfg.init_new_out,
                        "relative": cfg.relative,
                    },
                    gen,
                )
                current_sync().broadcast(width_c.trainables())  # rank 0's candidate initial values
            batches, score_batches = self._size(width_c.net, model, x, batches, score_batches, epoch, guard, report)
            with Timer(report.timings, "step_one"):
                self._step_one(width_c.net, width_c.trainables(), width_c, batches, loss_fn)
            # a new head (or a normalised stream's whole pool) is one candidate over its units (d/dg = their sum)
            per = dict(width_c.blocks)
            blocks = {f"new:{g.name}": per[g.name] for g in groups if new_count[g.name] and per[g.name] > 1}
            with Timer(report.timings, "step_two"):
                scores = candidate_scores(
                    self.config, width_c.net, width_c.bank, score_batches, loss_fn, blocks, report, self._joint_scores
                )
            for g in groups:
                if use_splits and splittable(g):  # heads and normalised streams are not split unit by unit
                    for i, s in enumerate(scores[f"split:{g.name}"].tolist()):
                        candidates.append(Candidate("split", g.name, i, s, costs[g.name]))
                if new_count[g.name] and per[g.name] > 1:
                    for j, s in enumerate(scores[f"new:{g.name}"].tolist()):
                        candidates.append(Candidate("head", g.name, j, s, costs[g.name] * per[g.name]))
                elif new_count[g.name]:
                    for j, s in enumerate(scores[f"new:{g.name}"].tolist()):
                        candidates.append(Candidate("new", g.name, j, s, costs[g.name]))
        if use_depth:
            after = cfg.depth_after or default_depth_boundaries(graph, model)
            if after:
                with Timer(report.timings, "build"):
                    depth_c = build_depth_candidates(
                        model, graph, after, x, cfg.init_layer_scale, block=cfg.depth_block
                    )
                    current_sync().broadcast(depth_c.trainables())
                if depth_c.skipped:  # candidates that could not be built or inserted: dropped, with why
                    report.extra.setdefault("skipped_candidates", {}).update(
                        {f"new layer after {a}": why for a, why in depth_c.skipped.items()}
                    )
                if not depth_c.after:
                    depth_c = None
            if depth_c is not None:
                after = depth_c.after
                if width_c is None:
                    batches, score_batches = self._size(
                        depth_c.net, model, x, batches, score_batches, epoch, guard, report
                    )
                with Timer(report.timings, "step_one"):
                    self._step_one(depth_c.net, depth_c.trainables(), None, batches, loss_fn, bn_train=depth_c)
                with Timer(report.timings, "step_two"):
                    scores = candidate_scores(
                        self.config, depth_c.net, depth_c.bank, score_batches, loss_fn, {}, report, self._joint_scores
                    )
                layer_costs = self._layer_costs(model, x, graph, depth_c)
                for i, s in enumerate(scores["layer"].tolist()):
                    candidates.append(Candidate("layer", after[i], i, s, layer_costs[i]))

        kept = select(candidates, self.budget, groups, allow_increase=cfg.allow_increase)
        if cfg.score_path != "joint":
            report.extra.setdefault("score_path", {}).update(compare_with_joint(
                candidates, kept, groups, self._joint_scores, self.budget, self.config.allow_increase
            ))
        exact = cfg.exact_params if cfg.exact_params is not None else depth_c is not None
        if exact and self.budget.kind == "params" and not self.budget.per_group:
            blocks = width_c.blocks if width_c is not None else {}
            kept = self._fit_params(model, graph, depth_c, kept, blocks, candidates)
        if depth_c is not None:
            report.extra["depth"] = depth_summary(candidates, kept, depth_c)
        self.last_scores = candidates
        report.predicted_loss_change = float(sum(c.score for c in kept))
        report.extra.update(
            {
                "candidates": len(candidates),
                "kept": len(kept),
                "budget": self.budget.__dict__,
                "budget_limit": self.budget.limit(groups),
            }
        )
        plan = self._materialize(graph, width_c, depth_c, kept, x)
        ctx.loss_batches = score_batches  # the loss after growth is read on the samples step two scored
        # returning frees the over-grown copies before the model itself grows
        return Decision(plan, calibrate_new_bn=False if cfg.bn_mode == "batch" else None)

    # ---- pieces ----------------------------------------------------------------------------------
    def _draw(self, data: GrowthData, device: torch.device) -> tuple[list[Any], list[Any], str]:
        """Step one's batches, step two's batches and where the scores are read. Fresh scoring draws its
        batches first, so step one's "all the rest" leaves them (and the safeguard's check batches) out:
        a score is then not read on the data step one fitted."""
        cfg = self.config
        if cfg.score_on not in ("fresh", "step-one"):
            raise GrowthError(f"score_on must be 'fresh' or 'step-one', not {cfg.score_on!r}")
        n_one = cfg.step_one_batches if cfg.step_one_batches is not None else cfg.step_one_steps
        if cfg.score_on == "fresh" and cfg.score_batches is not None:
            score = data.draw(cfg.score_batches, device)
            batches = data.draw(n_one, device)
            if score and batches:
                return batches, score, "fresh batches"
            batches = score + batches  # too little data for both: score in-sample and say so
            if not batches:
                raise GrowthError("growth data is empty")
            return batches, batches[: cfg.score_batches], "step-one batches (too few growth batches for both)"
        batches = take_batches(data, n_one, device)
        return batches, batches if cfg.score_batches is None else batches[: cfg.score_batches], "step-one batches"

    def _size(
        self,
        net: nn.Module,
        model: nn.Module,
        x: tuple[torch.Tensor, ...],
        batches: list[Any],
        score_batches: list[Any],
        epoch: int | None,
        guard: Safeguard,
        report: GrowthReport,
    ) -> tuple[list[Any], list[Any]]:
        """Cut the batches of steps one and two to the samples `cost_limit` affords.

        Costs in per-sample forward FLOPs F of the model (a training step ~ 3F): an epoch of `epoch`
        batches of B samples is 3F*epoch*B; a step-one step or a scored point on s samples of the
        over-grown net (r = its FLOPs / the model's) ~ 3rF*s; the safeguard's check ~ 4F per checked
        sample. So s = (limit*epoch*B - 4/3*check*B) / (r * (steps + score batches * points))."""
        cfg = self.config
        if cfg.sample_size is not None:  # under torch.distributed: this rank's share of the samples
            s = current_sync().share(int(cfg.sample_size))
        elif cfg.cost_limit is None or not epoch or not batches:
            report.extra["cost"] = {"limit": None}
            return batches, score_batches
        else:  # in global samples (all ranks' shards together), then this rank's share
            batch = int(batches[0][1].shape[0]) * current_sync().world_size
            # the model's count is the report's (measured once per step); the over-grown net is counted here
            base = report.flops_before if report.flops_before is not None else count_flops(model, x)
            ratio = count_flops(net, x) / max(base, 1)
            steps = len(batches) if cfg.step_one_steps is None else cfg.step_one_steps
            passes = steps + len(score_batches) * len(cfg.score_points)
            check = guard.check_batches if guard.check else 0
            afford = (cfg.cost_limit * epoch * batch - 4 / 3 * check * batch) / (ratio * max(passes, 1))
            s = max(cfg.min_samples, min(batch, int(afford)))
            report.extra["cost"] = {
                "limit_epochs": cfg.cost_limit,
                "epoch_batches": epoch,
                "overgrown_flops_ratio": ratio,
                "samples_per_batch": s,
                "estimated_epochs": (ratio * passes * s + 4 / 3 * check * batch) / (epoch * batch),
            }
            s = current_sync().share(s)
        return [_head(b, s) for b in batches], [_head(b, s) for b in score_batches]

    def _new_count(self, group: Any, groups: list[Any], unit_cost: float) -> int:
        """New-unit candidates for `group` (see `FireflyConfig.new_units`)."""
        k = self.config.new_units
        if k == "auto":
            share = self.budget.group_limit(group, groups) / max(unit_cost, 1e-12)
            return max(1, math.ceil(0.5 * group.width), math.ceil(2 * share))
        if isinstance(k, str):
            raise GrowthError(f"new_units must be 'auto', a fraction of the width or a count, not {k!r}")
        return int(k) if k >= 1 else max(1, math.ceil(k * group.width))

    def _step_one(
        self,
        net: nn.Module,
        params: list[nn.Parameter],
        width_c: WidthCandidates | None,
        batches: list[tuple[Any, Any]],
        loss_fn: LossFn,
        bn_train: DepthCandidates | None = None,
    ) -> None:
        """Optimise the candidates with all of them on (alpha = 1), old weights and BN statistics frozen."""
        cfg = self.config
        set_mode(net, self.config.bn_mode)
        if bn_train is not None:  # a new layer's own BatchNorm learns its statistics
            for layer in bn_train.layers:
                if is_residual(layer):  # (a copied transformer block stays in eval: no dropout)
                    layer.body.train()
        groups: list[dict[str, Any]] = [{"params": params}]
        scales = bn_train.lr_scales() if bn_train is not None and cfg.relative else {}
        if scales:  # a copied block's weights move by fractions of their own scale (`DepthCandidates.lr_scales`)
            groups = [{"params": [p for p in params if id(p) not in scales]}] if len(scales) < len(params) else []
            groups += [{"params": [p], "lr": cfg.lr * scales[id(p)]} for p in params if id(p) in scales]
        if cfg.step_one_optimizer == "rmsprop":
            opt = torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.rmsprop_alpha, momentum=cfg.momentum)
        elif cfg.step_one_optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr)
        elif cfg.step_one_optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        else:
            raise GrowthError(f"step_one_optimizer must be adam, rmsprop or sgd, not {cfg.step_one_optimizer!r}")
        bank = width_c.bank if width_c is not None else bn_train.bank  # type: ignore[union-attr]
        bank.alpha = 1.0
        bank.reset(requires_grad=False)
        steps = len(batches) if cfg.step_one_steps is None else cfg.step_one_steps  # cycling over the batches
        penalised = []
        if width_c is not None:
            penalised = [(v, cfg.split_penalty) for per in width_c.split_dirs.values() for v in per.values()]
            penalised += [(v, cfg.new_penalty) for per in width_c.new_in.values() for v in per.values()]
        for x, y in itertools.islice(itertools.cycle(batches), steps):
            opt.zero_grad(set_to_none=True)
            for xc, yc, weight in micro_batches(x, y, cfg.micro_batch):
                (loss_fn(net(*xc), yc) * weight).backward()
            if penalised:
                sum(lam * v.pow(2).sum() for v, lam in penalised).backward()
            current_sync().mean_grads(params, len(y))  # every rank's shard, as DDP would
            opt.step()
            if width_c is not None:
                project_into_ball(width_c, cfg)
            if cfg.max_norm is not None:
                with torch.no_grad():
                    for v in params:
                        if v.dim() > 1:
                            norms = v.flatten(1).norm(dim=1).clamp(min=1e-12)
                            v.mul_((cfg.max_norm / norms).clamp(max=1.0).view(-1, *([1] * (v.dim() - 1))))
        for p in params:
            p.requires_grad_(False)
        if bn_train is not None:  # the new layers' BatchNorm statistics, over every rank's shard
            current_sync().average_buffers(m for layer in bn_train.layers for m in layer.modules())
        net.eval()

    def _layer_costs(
        self, model: nn.Module, x: tuple[torch.Tensor, ...], graph: Any, depth_c: DepthCandidates
    ) -> list[float]:
        """Each new layer's cost on the width candidates' scale: parameters added (body and scale), per-sample
        FLOPs added, or in units the parameters of as many new units of the group it sits on."""
        params = [float(depth_c.added_params(i)) for i in range(len(depth_c.layers))]
        if self.budget.currency == "units":
            out = []
            for after, spec, n in zip(depth_c.after, depth_c.specs, params):
                name = graph.boundaries[after].group
                unit = unit_param_cost(graph[name], model) if name in graph.groups else 0
                out.append(n / unit if unit > 0 else float(spec.get("channels", spec.get("features", 1))))
            return out
        if self.budget.currency == "params":
            return params
        return [
            float(max(1, plan_cost(model, Plan(layers=[NewLayer(a, _layer_kind(spec), spec)]), x, graph).flops))
            for a, spec in zip(depth_c.after, depth_c.specs)
        ]

    def _fit_params(
        self,
        model: nn.Module,
        graph: Any,
        depth_c: DepthCandidates | None,
        kept: list[Candidate],
        blocks: dict[str, int] | None = None,
        pool: list[Candidate] | None = None,
    ) -> list[Candidate]:
        """Greedy selection adds per-candidate costs; units added to two adjacent groups, or a new block on
        a group that also widens, add cross terms. Drop the kept candidate with the worst score per cost
        until the exact parameter increase (the selection's plan, costed from its shapes) fits the budget;
        then refill what that freed from `pool` in the same order, each candidate kept when the exact increase
        with it still fits (dropping a new block that was widened with its group can free far more than the
        cross terms took: without the refill most of the budget went unspent)."""
        limit = self.budget.limit([])

        def exact(ks: list[Candidate]) -> int:
            return exact_added_params(model, graph, depth_c, ks, blocks) if ks else 0

        def rank(c: Candidate) -> float:
            return c.score / c.cost

        kept = sorted(kept, key=rank)
        while kept and exact(kept) > limit + 1e-9:
            kept = kept[:-1]
        spent, chosen = exact(kept), {id(c) for c in kept}
        for c in sorted(pool or [], key=rank):
            if id(c) in chosen or (c.score >= 0 and not self.config.allow_increase):
                continue
            if spent + c.cost > limit + 1e-9:  # its own cost alone does not fit (cross terms only add)
                continue
            trial = exact([*kept, c])
            if trial <= limit + 1e-9:
                kept.append(c)
                spent = trial
        return kept

    def _materialize(
        self,
        graph: Any,
        width_c: WidthCandidates | None,
        depth_c: DepthCandidates | None,
        kept: list[Candidate],
        x: tuple[torch.Tensor, ...],
    ) -> Plan:
        by_group: dict[str, tuple[list[int], list[int]]] = {}
        for c in kept:
            if c.kind in ("split", "new"):
                s, n = by_group.setdefault(c.group, ([], []))
                (s if c.kind == "split" else n).append(c.index)
            elif c.kind == "head":  # its head_dim new units (a normalised stream: its whole pool)
                per = width_c.blocks.get(c.group, 1) if width_c is not None else block_size(graph[c.group]) or 1
                by_group.setdefault(c.group, ([], []))[1].extend(range(c.index * per, (c.index + 1) * per))
        changes = materialize_width(width_c, by_group) if width_c is not None else []
        layers = []
        if depth_c is not None:
            change_of = {c.group.name: c for c in changes}
            for c in kept:
                if c.kind != "layer":
                    continue
                layer = depth_c.layers[c.index]
                spec = dict(depth_c.specs[c.index])
                if spec["type"] == "copy":  # a new transformer block, copied from a block that may widen
                    params = _widen_copy(depth_c.sources[c.index], c.group, depth_c.block_values(c.index), changes)
                    layers.append(NewLayer(c.group, "copy", spec, params))
                    continue
                params = {k: v.detach().clone() for k, v in layer.body.state_dict().items()}
                boundary = graph.boundaries[c.group]
                change = change_of.get(boundary.group) if boundary.group else None
                if change is not None and change.added:
                    spec, params = _widen_body(spec, params, change)
                scale = float(layer.parametrizations.scale.original.detach())
                layers.append(NewLayer(c.group, "residual", spec, params, scale))
        return Plan(
            changes,
            layers,
            function_preserving=False,
            method=f"firefly[{self.preset}]",
            input_shapes=[list(t.shape) for t in x],
        )


def _tied(group: Any, model: nn.Module) -> list[str]:
    """Names of one tensor under two names among the group's members (an LM head tied to the embedding): the
    engine grows it once, but candidate perturbations are kept per name, so Firefly leaves the group alone."""
    seen: dict[int, str] = {}
    for m in group.members:
        mod_name, _, attr = m.tensor.rpartition(".")
        try:
            t = getattr(model.get_submodule(mod_name) if mod_name else model, attr)
        except AttributeError:
            continue
        if isinstance(t, torch.Tensor):
            first = seen.setdefault(id(t), m.tensor)
            if first != m.tensor:
                return [first, m.tensor]
    return []


@torch.no_grad()
def project_into_ball(width_c: WidthCandidates, cfg: FireflyConfig) -> None:
    """Keep every candidate inside its neighbourhood: per-unit RMS of its (relative) value <= radius."""
    for per, radius in (
        (width_c.split_dirs, cfg.split_radius),
        (width_c.new_in, cfg.new_in_radius),
        (width_c.new_out, cfg.new_out_radius),
    ):
        if radius is None:
            continue
        for values in per.values():
            for v in values.values():
                rms = v.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-12)
                v.mul_((radius / rms).clamp(max=1.0).view(-1, *([1] * (v.dim() - 1))))
