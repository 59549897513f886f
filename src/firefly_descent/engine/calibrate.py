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

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..analysis.rules import batchnorms, is_batchnorm
from ..collective import current_sync
from ..plan import Plan
from .apply import growth_history, plan_edits
from .tensors import NEW, build_source_map

__all__ = ["calibrate_new_batchnorm", "new_norm_channels", "prepare_batchnorm", "refresh_batchnorm"]


def _renamed(name: str, wrapped: str) -> str:
    """Inserting a layer after module `wrapped` turns it into `wrapped.0` (and its tensors with it)."""
    if name == wrapped or name.startswith(wrapped + "."):
        return wrapped + ".0" + name[len(wrapped) :]
    return name


def new_norm_channels(model: nn.Module, history: Iterable[dict[str, Any]]) -> dict[str, list[int]]:
    """BatchNorm module name -> channel indices, in `model`'s current layout, of the units that
    `history`'s plans added.

    `history` is a list of plan dicts in application order, the last ones applied to `model` (a slice of
    its growth history: `growth_history(model)[n_before:]`). Positions are followed through every plan
    with the engine's own source maps (so concatenations, where one BatchNorm normalises several groups
    at offsets, and twins of new units are handled), and through the renames of inserted layers.
    A twin of a new unit counts as new; a twin of an old unit copies a calibrated channel and does not.
    """
    plans = [Plan.from_dict(entry) for entry in history]
    # per plan: running-mean tensor (its name in the final model) -> the plan's segments on it
    steps: list[dict[str, list[Any]]] = []
    for k, plan in enumerate(plans):
        step: dict[str, list[Any]] = {}
        for tensor, dims in plan_edits(plan).items():
            segs = [seg for seg in dims.get(0, []) if seg.member.kind == "running_mean"]
            if not segs:
                continue
            final = tensor
            for later in plans[k:]:
                for layer in later.layers:
                    final = _renamed(final, layer.after)
            step[final] = segs
        steps.append(step)
    sizes: dict[str, int] = {}
    for tensor in {t for step in steps for t in step}:
        module_name = tensor.rpartition(".")[0]
        try:
            buf = model.get_submodule(module_name).running_mean
        except AttributeError:
            continue
        if buf is None:
            continue
        segs = [seg for step in steps for seg in step.get(tensor, [])]
        added = sum((len(seg.order) - seg.change.group.width) * seg.member.inner for seg in segs)
        sizes[tensor] = buf.shape[0] - added
    tracked: dict[str, set[int]] = {t: set() for t in sizes}
    for step in steps:
        for tensor, segs in step.items():
            if tensor not in sizes:
                continue
            smap, _ = build_source_map(sizes[tensor], segs)
            old = tracked[tensor]
            tracked[tensor] = {
                q
                for q, (kind, src) in enumerate(zip(smap.kind.tolist(), smap.src.tolist()))
                if kind == NEW or src in old
            }
            sizes[tensor] = smap.size
    return {t.rpartition(".")[0]: sorted(idx) for t, idx in tracked.items() if idx}


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
        if not is_batchnorm(m) or m.running_mean is None or not m.affine or not idx:
            continue  # without γ and β the train-mode map cannot be made to match
        targets[name] = (m, torch.as_tensor(idx, dtype=torch.long, device=m.running_mean.device))
    if not targets:
        return 0
    bns = batchnorms(model)
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
        elif current_sync().active:  # inside a sharded growth step: the statistics of every rank's shard
            sums = current_sync().sum(sums)
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


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in batchnorms(model, tracking=True) if m.track_running_stats]


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Recompute every BatchNorm's running statistics as a cumulative average over `batches`.

    After growth, the running statistics of layers downstream of new units describe the old network;
    this makes eval mode describe the grown one. Runs in train mode under `no_grad` with
    ``momentum=None``, then restores each momentum and the model's mode. `batches` yields inputs (or
    tuples whose first item is the input) on the model's device. Returns the number of layers refreshed.
    """
    bns = _batchnorms(model)
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(*x) if isinstance(x, tuple) else model(x)
            seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        if not seen:  # nothing measured: keep the old statistics rather than the reset ones
            for m, (rm, rv) in zip(bns, saved):
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
        model.train(was_training)
    current_sync().average_buffers(bns)  # inside a sharded growth step: over every rank's shard
    return len(bns) if seen else 0


def prepare_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    since: int,
    *,
    calibrate: bool = True,
    refresh: bool = True,
    max_batches: int | None = None,
) -> dict[str, int]:
    """Leave a model that just grew ready to train: calibrate the BatchNorm channels of the units added
    by the plans applied after the first `since` entries of its growth history (so train mode computes
    what eval mode scored), then refresh every BatchNorm's running statistics (so eval mode describes the
    grown network). `batches` must be re-iterable (a list or a DataLoader). Growers do this themselves
    (`prepare_batchnorm=True`, the default); call it when you apply plans yourself.

        n = len(ff.growth_history(model)); ff.apply(model, plan, opt); ff.prepare_batchnorm(model, batches, n)
    """

    batches = list(itertools.islice(iter(batches), max_batches)) if max_batches is not None else batches
    done = {"calibrated_channels": 0, "refreshed_layers": 0}
    if calibrate:
        channels = new_norm_channels(model, growth_history(model)[since:])
        if channels:
            done["calibrated_channels"] = calibrate_new_batchnorm(model, channels, batches)
    if refresh:
        done["refreshed_layers"] = refresh_batchnorm(model, batches)
    return done
