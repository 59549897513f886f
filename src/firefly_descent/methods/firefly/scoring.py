"""Firefly's step two: score every candidate of the over-grown network by an integrated gradient of the loss.

`joint_scores` moves all gates together along one path (one backward pass per point and batch gives every
dL/dg_i); `per_candidate` integrates each candidate along its own gate with the others on (the paper's s_i,
`score_path="per-candidate"`), exactly or by quadrature; `candidate_scores` picks between them and the report
compares the two. Kept apart from `descent.py`, which holds step one, the selection and the materialisation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...analysis.rules import batchnorms
from ...budget import Budget, Candidate, select
from ...collective import current_sync
from ..base import GrowthReport, LossFn, as_inputs
from .candidates import GateBank
from .config import FireflyConfig, midpoints


def micro_batches(x: Any, y: torch.Tensor, size: int | None) -> Iterator[tuple[tuple[Any, ...], torch.Tensor, float]]:
    """(inputs, targets, weight) chunks of at most `size` samples; weights are chunk fractions, so the
    weighted chunk losses of a mean-reduced loss sum to the batch loss."""
    inputs = as_inputs(x)
    n = len(y)
    if size is None or n <= size:
        yield inputs, y, 1.0
        return
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield tuple(t[start:stop] for t in inputs), y[start:stop], (stop - start) / n


def set_mode(net: nn.Module, bn_mode: str) -> None:
    """Eval mode; with bn_mode="batch", BatchNorm layers use batch statistics (momentum 0: the running
    statistics stay as they are)."""
    net.eval()
    if bn_mode == "batch":
        for m in batchnorms(net):
            m.train()
            m.momentum = 0.0


def joint_scores(
    cfg: FireflyConfig, net: nn.Module, bank: GateBank, batches: list[tuple[Any, Any]], loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """s_i ~ mean over alpha_k and batches of dL/dg_i: the predicted loss change of switching i on."""
    set_mode(net, cfg.bn_mode)
    total = {k: torch.zeros_like(g) for k, g in bank.gates.items()}
    count = samples = 0
    for alpha in cfg.score_points:
        bank.alpha = float(alpha)
        for x, y in batches:
            bank.reset(requires_grad=True)
            keys = list(bank.gates)
            for xc, yc, weight in micro_batches(x, y, cfg.micro_batch):
                loss = loss_fn(net(*xc), yc) * weight
                grads = torch.autograd.grad(loss, [bank.gates[k] for k in keys], allow_unused=True)
                for k, gr in zip(keys, grads):
                    if gr is not None:
                        total[k] += gr.detach()
            count += 1
            samples += len(y)
    bank.alpha = 1.0
    bank.reset(requires_grad=False)
    net.eval()
    return current_sync().mean_dict({k: v / max(1, count) for k, v in total.items()}, samples)


def candidate_scores(
    cfg: FireflyConfig,
    net: nn.Module,
    bank: GateBank,
    batches: list[tuple[Any, Any]],
    loss_fn: LossFn,
    blocks: dict[str, int],
    report: GrowthReport,
    joint_store: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One score per candidate along `score_path`; `blocks[key]` gates form one candidate (a head). The
    joint scores are always read (cheap): the per-candidate path rescores their best `score_top` and the
    report compares the two."""
    joint = joint_scores(cfg, net, bank, batches, loss_fn)
    joint = {k: v.view(-1, blocks[k]).sum(1) if k in blocks else v for k, v in joint.items()}
    if cfg.score_path == "joint":
        return joint
    joint_store.update({k: v.detach().cpu() for k, v in joint.items()})
    flat = torch.cat([v.detach().flatten().cpu() for v in joint.values()]) if joint else torch.zeros(0)
    total = flat.numel()
    top = cfg.score_top
    k = total if top is None else min(total, int(top) if top >= 1 else max(1, math.ceil(top * total)))
    chosen = set(torch.argsort(flat, stable=True)[:k].tolist())  # most negative: predicted largest gain
    only, offset = {}, 0
    for key, v in joint.items():
        only[key] = [j for j in range(v.numel()) if offset + j in chosen]
        offset += v.numel()
    rescored = per_candidate(cfg, net, bank, batches, loss_fn, blocks, only)
    out = {}
    for key, v in joint.items():
        out[key] = v.clone()
        if only[key]:
            idx = torch.tensor(only[key], device=v.device)
            out[key][idx] = rescored[key].to(v.device, v.dtype)[idx]
    summary = report.extra.setdefault("score_path", {"path": "per-candidate", "rescored": 0, "candidates": 0})
    summary["rescored"] += k
    summary["candidates"] += total
    summary["points"] = cfg.per_candidate_points or "exact"
    return out


def compare_with_joint(
    candidates: list[Candidate], kept: list[Candidate], groups: list[Any], joint_store: dict[str, torch.Tensor],
    budget: Budget, allow_increase: bool,
) -> dict:
    """How far the per-candidate path moved the decision: the rank correlation of the two scores and the
    share of the joint path's selection (before any exact-parameter trim) that is kept."""
    def key(c: Candidate) -> str:
        return "layer" if c.kind == "layer" else f"{'split' if c.kind == 'split' else 'new'}:{c.group}"

    joint = [dataclasses.replace(c, score=float(joint_store[key(c)][c.index])) for c in candidates]
    kept_joint = select(joint, budget, groups, allow_increase=allow_increase)
    ident = {(c.kind, c.group, c.index) for c in kept}
    same = sum((c.kind, c.group, c.index) in ident for c in kept_joint)
    a = torch.tensor([c.score for c in candidates], dtype=torch.float64)
    b = torch.tensor([c.score for c in joint], dtype=torch.float64)
    rank = lambda t: torch.argsort(torch.argsort(t)).double()  # noqa: E731
    rho = float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1]) if len(a) > 1 else float("nan")
    return {"spearman_with_joint": rho, "kept_joint": len(kept_joint), "kept_also_by_joint": same}


def per_candidate(
    cfg: FireflyConfig,
    net: nn.Module,
    bank: GateBank,
    batches: list[tuple[Any, Any]],
    loss_fn: LossFn,
    blocks: dict[str, int],
    only: dict[str, list[int]],
) -> dict[str, torch.Tensor]:
    """The paper's s_i = integral over i's own gate 0 -> 1 of dL/dg_i with every other candidate on.

    Exact (`per_candidate_points=None`): L(all on) - L(all on but i off), N + 1 forwards of the over-grown
    net per score batch for N candidates, no backward. Quadrature (n points): dL/dg_i at g_i = alpha_k
    (others 1) for the n midpoints alpha_k, n forward+backward passes per candidate and batch. The joint
    path costs one forward+backward per point and batch for all candidates together (~6 forwards at its 2
    points), so the exact path is ~N/6 times dearer and the quadrature ~n*N/2; `score_top` bounds N.
    Candidates not in `only` are left at 0."""
    set_mode(net, cfg.bn_mode)
    n = cfg.per_candidate_points
    alphas = midpoints(n) if n is not None else None
    bank.alpha = 0.0  # multiplier = g: 1 = on, 0 = off
    base = {k: torch.ones_like(g) for k, g in bank.gates.items()}
    total = {k: [0.0] * (g.numel() // blocks.get(k, 1)) for k, g in base.items()}
    count = samples = 0
    try:
        for x, y in batches:
            chunks = list(micro_batches(x, y, cfg.micro_batch))
            bank.gates = dict(base)
            all_on = batch_loss(net, chunks, loss_fn) if alphas is None else 0.0
            for key, picked in only.items():
                b = blocks.get(key, 1)
                for j in picked:
                    sl = slice(j * b, (j + 1) * b)
                    if alphas is None:
                        off = base[key].clone()
                        off[sl] = 0.0
                        bank.gates = {**base, key: off}
                        total[key][j] += all_on - batch_loss(net, chunks, loss_fn)
                        continue
                    for a in alphas:
                        g = base[key].clone()
                        g[sl] = a
                        g.requires_grad_(True)
                        bank.gates = {**base, key: g}
                        for xc, yc, weight in chunks:
                            (grad,) = torch.autograd.grad(loss_fn(net(*xc), yc) * weight, [g])
                            total[key][j] += float(grad[sl].sum()) / len(alphas)
            count += 1
            samples += len(y)
    finally:
        bank.alpha = 1.0
        bank.reset(requires_grad=False)
        net.eval()
    means = {k: torch.tensor(v, dtype=base[k].dtype, device=base[k].device) / max(1, count)
             for k, v in total.items()}
    return current_sync().mean_dict(means, samples)


@torch.no_grad()
def batch_loss(net: nn.Module, chunks: list[tuple[tuple[Any, ...], torch.Tensor, float]], loss_fn: LossFn) -> float:
    """The batch loss, summed over its weighted micro-batches."""
    return sum(float(loss_fn(net(*xc), yc)) * weight for xc, yc, weight in chunks)
