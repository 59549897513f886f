"""Make new BatchNorm channels function-preserving in train mode too.

The engine gives a new unit a fresh BatchNorm channel (γ=1, β=0, running mean 0, running var 1), so in
eval mode the channel is the map y ≈ h and the plan's function check passes. In train mode, though,
BatchNorm divides by the *batch* standard deviation: a new unit whose pre-activation h is tiny (a
Firefly candidate's ε·δ, GradMax's near-zero incoming weights) is blown up to unit variance, and its
outgoing weights, chosen for the small h, inject noise the moment training resumes.

`calibrate_new_batchnorm` measures each new channel's batch statistics (μ, σ²) on a few training batches
and rewrites the channel so that its train-mode map equals the eval-mode map the growth method scored:

    γ' = γ·sqrt(σ² + eps)/sqrt(v + eps),   β' = β + γ·(μ − m)/sqrt(v + eps),   running (m, v) := (μ, σ²)

where (γ, β, m, v) are the channel's values after `apply`. Eval-mode output is unchanged exactly; train
mode then matches it up to the batch-to-batch fluctuation of μ and σ. `new_norm_channels` finds the new
channels from the growth history the engine records, so this works for every method's plans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..plan import Plan
from .tensors import NEW, OLD, TWIN, unit_order

__all__ = ["calibrate_new_batchnorm", "new_norm_channels"]


def _remap(order: list[tuple[int, int]], tracked: set[int], splits: list[int]) -> tuple[set[int], list[int]]:
    """Positions of the tracked old units after a change, and the positions of its new units (twins of
    tracked units count as new: they copy a channel that is itself uncalibrated)."""
    moved, fresh = set(), []
    for pos, (kind, idx) in enumerate(order):
        if kind == OLD and idx in tracked:
            moved.add(pos)
        elif kind == NEW or (kind == TWIN and splits[idx] in tracked):
            fresh.append(pos)
    return moved, fresh


def new_norm_channels(history: Iterable[dict[str, Any]]) -> dict[str, list[int]]:
    """BatchNorm-like module name -> channel indices of the units added by `history`'s plans.

    `history` is a list of plan dicts in application order (a slice of the model's growth history:
    `growth_history(model)[n_before:]`). Indices are in the model's layout after the last plan.
    """
    tracked: dict[str, set[int]] = {}
    for entry in history:
        plan = Plan.from_dict(entry)
        for change in plan.changes:
            norms = sorted({m.module for m in change.group.members if m.role == "norm"})
            if not norms:
                continue
            order = unit_order(change)
            splits = [s.unit for s in change.splits]
            for name in norms:
                moved, fresh = _remap(order, tracked.get(name, set()), splits)
                tracked[name] = moved | set(fresh)
        for layer in plan.layers:  # inserting after module `a` wraps it: `a` becomes `a.0`
            tracked = {_renamed(name, layer.after): idx for name, idx in tracked.items()}
    return {name: sorted(idx) for name, idx in tracked.items() if idx}


def _renamed(name: str, wrapped: str) -> str:
    if name == wrapped or name.startswith(wrapped + "."):
        return wrapped + ".0" + name[len(wrapped) :]
    return name


@torch.no_grad()
def calibrate_new_batchnorm(
    model: nn.Module,
    channels: dict[str, list[int]],
    batches: Iterable[Any],
    max_batches: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Rewrite the listed BatchNorm channels so train mode computes what eval mode does (see module doc).

    `batches` yields model inputs (or tuples whose first item is the input), already on the model's
    device. The forward passes run in train mode; every BatchNorm's running statistics and the model's
    mode are restored afterwards, so only the listed channels change. Returns the number of channels
    calibrated (0 when there is nothing to do or no batch).

    `reduce` combines the per-channel sums [count, Σh, Σh²] across processes before they are used (e.g. a
    `torch.distributed.all_reduce` with SUM wrapped to return its tensor), so that every replica writes the
    same channels.
    """
    targets: dict[str, tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor]] = {}
    for name, idx in channels.items():
        m = model.get_submodule(name)
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None or not m.affine or not idx:
            continue  # without γ and β the train-mode map cannot be made to match
        targets[name] = (m, torch.as_tensor(idx, dtype=torch.long, device=m.running_mean.device))
    if not targets:
        return 0
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    stats: dict[str, list[torch.Tensor]] = {name: [] for name in targets}  # per batch: count, sum, sum of squares
    # the eval-mode map of each new channel, y = scale·(h − rm) + β, as it was before calibration
    maps = {
        name: (m.weight[idx] / torch.sqrt(m.running_var[idx] + m.eps), m.running_mean[idx].clone(), m.bias[idx].clone())
        for name, (m, idx) in targets.items()
    }

    def observe(name: str):
        """Record the new channels' batch statistics, then give the layers downstream what they will see
        after calibration (the eval-mode map), so that all BatchNorms calibrate in one pass."""
        idx = targets[name][1]
        scale, rm, beta = maps[name]

        def fn(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            h = args[0].index_select(1, idx)
            flat = h.double().transpose(0, 1).reshape(len(idx), -1)
            count = torch.full_like(flat[:, 0], flat.shape[1])
            stats[name].append(torch.stack([count, flat.sum(1), (flat * flat).sum(1)]))
            shape = [1, len(idx)] + [1] * (h.dim() - 2)
            y = (h - rm.view(shape)) * scale.view(shape) + beta.view(shape)
            return out.index_copy(1, idx, y.to(out.dtype))

        return fn

    handles = [targets[n][0].register_forward_hook(observe(n)) for n in targets]
    was_training = model.training
    model.train()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, buf in zip(bns, saved):
            for k, v in buf.items():
                getattr(m, k).copy_(v)
        model.train(was_training)
    done = 0
    for name, (m, idx) in targets.items():
        if not stats[name]:
            continue
        sums = torch.stack(stats[name]).sum(0)
        if reduce is not None:
            sums = reduce(sums)
        n, s, ss = sums
        mu = s / n
        var = (ss / n - mu * mu).clamp(min=0.0)
        scale, rm, beta = (t.double() for t in maps[name])
        m.bias[idx] = (beta + scale * (mu - rm)).to(m.bias.dtype)
        m.weight[idx] = (scale * torch.sqrt(var + m.eps)).to(m.weight.dtype)
        # the biased variance (what train mode divides by) keeps the eval-mode map exact; a later
        # refresh of the running statistics differs from it only by BatchNorm's n/(n-1) correction
        m.running_mean[idx] = mu.to(m.running_mean.dtype)
        m.running_var[idx] = var.to(m.running_var.dtype)
        done += len(idx)
    return done
