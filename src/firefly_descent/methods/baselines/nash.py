"""NASH (Elsken, Metzen, Hutter 2017): random network morphisms, short training, pick on validation.

Each of `children` deep copies of the model gets a random morphism (plan): Net2Net-style random
splits under the budget (width, probability `width_prob`) and/or one identity-initialised layer at a
random eligible boundary (depth, probability `depth_prob`; a child that draws neither gets width).
Each child trains for `child_steps` SGD steps (momentum, cosine-annealed learning rate) on the
training batches, and the child with the lowest loss on VALIDATION data wins. The winner's plan
is then applied to the real model through the engine (so the optimizer is remapped) and the
winner's trained weights are copied in with `load_state_dict`.

Validation data: `self.val_data` when the caller set it (the training loop does, because
`needs_validation` is True), otherwise a seeded fraction `val_fraction` of the samples of every
growth batch, held out from child training. `grow` has no way to receive a test set: it only
iterates `data` and `self.val_data`. (The authors' code selected on test data and kept the last
child; neither is copied here.)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ...engine import apply
from ...errors import GrowthError
from ...plan import Plan
from ..base import Decision, LossFn, Timer, as_inputs, mean_loss, register_grower, take_batches
from ._common import BaselineGrower, Context
from .net2net import DEEPEN_KINDS, pick_layers, split_changes

Batch = tuple[Any, Any]


def _index(x: Any, idx: torch.Tensor) -> Any:
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)]
    return tuple(t[idx.to(t.device)] for t in x)


def carve_validation(batches: list[Batch], fraction: float, gen: torch.Generator) -> tuple[list[Batch], list[Batch]]:
    """Split every batch's samples into (train, validation) parts with a seeded permutation."""
    train: list[Batch] = []
    val: list[Batch] = []
    for x, y in batches:
        n = int(y.shape[0])
        k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        perm = torch.randperm(n, generator=gen)
        if k:
            val.append((_index(x, perm[:k]), y[perm[:k].to(y.device)]))
        train.append((_index(x, perm[k:]), y[perm[k:].to(y.device)]))
    if not val:
        raise GrowthError("nash needs validation data: set grower.val_data, or give batches of more than one sample")
    return train, val


@register_grower("nash")
class NASH(BaselineGrower):
    """Random morphisms, `children` briefly trained copies, the best on validation data wins.

    kwargs: budget=0.35, seed=0, children=8, child_steps=20, child_lr=0.05, momentum=0.9,
    weight_decay=5e-4, noise=0.01 (Net2Net symmetry-breaking noise, relative std), width_prob=1.0,
    depth_prob=0.5, deepen_kind="auto", val_fraction=0.2 (used only without val_data),
    val_batches=None (all of val_data), batches=20 (of data: child training + carving), groups=None.
    """

    name = "nash"
    needs_validation = True

    def __init__(
        self,
        budget: Any = 0.35,
        seed: int = 0,
        children: int = 8,
        child_steps: int = 20,
        child_lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        noise: float = 0.01,
        width_prob: float = 1.0,
        depth_prob: float = 0.5,
        deepen_kind: str = "auto",
        val_fraction: float = 0.2,
        val_batches: int | None = None,
        batches: int | None = 20,
        groups: list[str] | None = None,
        per_group: bool = False,
    ) -> None:
        super().__init__(budget, seed, batches, groups, per_group)
        if children < 1 or child_steps < 0:
            raise ValueError("nash needs children >= 1 and child_steps >= 0")
        if deepen_kind not in DEEPEN_KINDS:
            raise ValueError(f"deepen_kind must be one of {', '.join(DEEPEN_KINDS)}, not {deepen_kind!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
        self.children, self.child_steps = int(children), int(child_steps)
        self.child_lr, self.momentum, self.weight_decay = float(child_lr), float(momentum), float(weight_decay)
        self.noise, self.width_prob, self.depth_prob = float(noise), float(width_prob), float(depth_prob)
        self.deepen_kind, self.val_fraction, self.val_batches = deepen_kind, float(val_fraction), val_batches
        self.val_data: Iterable[Any] | None = None  # set by the training loop (needs_validation)

    def morphism(self, ctx: Context, gen: torch.Generator) -> Plan:
        """One child's random morphism as a plan for the current model."""
        widen = bool(torch.rand(1, generator=gen) < self.width_prob)
        deepen = bool(torch.rand(1, generator=gen) < self.depth_prob)
        widen = widen or not deepen
        changes = split_changes(ctx, self.budget, gen, self.noise) if widen else []
        added = {c.group.name: c.added for c in changes}
        layers = pick_layers(ctx, None, self.deepen_kind, gen, added) if deepen else []
        return self.make_plan(ctx, changes, layers, preserving=self.noise == 0)

    def train_child(self, child: nn.Module, train: list[Batch], loss_fn: LossFn) -> None:
        """`child_steps` SGD steps with a cosine-annealed learning rate, cycling over `train`."""
        params = [p for p in child.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.child_lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.child_steps))
        child.train()
        for step in range(self.child_steps):
            x, y = train[step % len(train)]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(child(*as_inputs(x)), y)
            if not torch.isfinite(loss):
                break
            loss.backward()
            opt.step()
            sched.step()

    def decide(self, ctx: Context) -> Decision:
        model, loss_fn, report = ctx.model, ctx.loss_fn, ctx.report
        if self.val_data is not None:
            train, val = ctx.batches, take_batches(self.val_data, self.val_batches, ctx.device)
            report.extra["validation"] = "val_data"
        else:
            train, val = carve_validation(ctx.batches, self.val_fraction, ctx.gen)
            report.extra["validation"] = f"carved from the growth batches (fraction {self.val_fraction:g})"
        t0 = time.perf_counter()
        best: tuple[float, int, Plan, nn.Module] | None = None
        losses: list[float] = []
        morphs: list[dict[str, Any]] = []
        with Timer(report.timings, "search"):
            for i in range(self.children):
                gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.gen)))
                plan = self.morphism(ctx, gen)
                child = copy.deepcopy(model)
                apply(child, plan, None, ctx.x, record=False)
                self.train_child(child, train, loss_fn)
                v = mean_loss(child, val, loss_fn)
                v = v if math.isfinite(v) else math.inf
                losses.append(v)
                morphs.append({"split": sum(len(c.splits) for c in plan.changes),
                               "layers": [ly.after for ly in plan.layers]})
                if best is None or v < best[0]:
                    best = (v, i, plan, child)
                else:
                    del child
        assert best is not None
        val_loss, winner, plan, child = best
        report.extra.update({
            "search_time": time.perf_counter() - t0,
            "children": self.children,
            "child_steps": self.child_steps,
            "val_losses": losses,
            "winner": winner,
            "winner_val_loss": val_loss,
            "morphisms": morphs,
        })
        state = child.state_dict()
        # the step is the morphism plus the winner's training: checked as one, never scaled
        return Decision(plan, finalize=lambda: model.load_state_dict(state))
