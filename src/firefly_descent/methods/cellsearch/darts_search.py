"""DARTS (Liu, Simonyan, Yang, ICLR 2019), written from the paper: the continuous relaxation of the cell.

Every edge (j -> i) of a cell computes a softmax(α)-weighted mixture of all eight operations (pooling
followed by a non-affine BatchNorm, as in the paper's search); each intermediate node sums all its
incoming edges. The architecture parameters α (one matrix for normal cells, one for reduction cells,
shared by all cells of a type) and the weights w are trained alternately: an α step on a validation
batch, then a w step on a training batch. First order uses the plain gradient ∂L_val/∂α at the current
w; second order (`order=2`) the gradient of L_val(w - ξ∇_w L_train(w), α), its Hessian-vector term
approximated by finite differences as the paper describes. The discrete cell keeps, per node, the two
incoming edges with the strongest non-`none` operation, each with that operation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models.darts import FactorizedReduce, ReLUConvBN, make_op
from ...models.genotype import PRIMITIVES, Genotype


class MixedOp(nn.Module):
    """softmax-weighted sum of every operation on one edge."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        ops = []
        for name in PRIMITIVES:
            op = make_op(name, channels, stride, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    """All edges j -> i (j < i) present as mixed operations."""

    def __init__(self, steps: int, c_pp: int, c_p: int, channels: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction, self.steps = reduction, steps
        self.preprocess0 = (
            FactorizedReduce(c_pp, channels, False) if reduction_prev else ReLUConvBN(c_pp, channels, 1, 1, 0, False)
        )
        self.preprocess1 = ReLUConvBN(c_p, channels, 1, 1, 0, False)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and j < 2 else 1) for i in range(2, 2 + steps) for j in range(i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for i in range(2, 2 + self.steps):
            states.append(sum(self.edges[e + j](states[j], weights[e + j]) for j in range(i)))
            e += i
        return torch.cat(states[2:], dim=1)


def num_edges(steps: int) -> int:
    return sum(range(2, 2 + steps))


class SearchNetwork(nn.Module):
    """The DARTS search network: stem, `layers` search cells, classifier; α shared per cell type."""

    def __init__(
        self, C: int = 16, layers: int = 8, num_classes: int = 10, in_channels: int = 3, steps: int = 4,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__()
        self.steps = steps
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(SearchCell(steps, c_pp, c_p, c_curr, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, steps * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)
        n = num_edges(steps)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n, len(PRIMITIVES)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        ids = {id(a) for a in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        wn, wr = F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, wr if cell.reduction else wn)
        return self.classifier(torch.flatten(self.global_pooling(s1), 1))

    def genotype(self) -> Genotype:
        """Top-2 incoming edges per node by their strongest non-`none` weight, each with that operation."""
        none = PRIMITIVES.index("none")

        def parse(alpha: torch.Tensor) -> list[tuple[str, int, int]]:
            w = F.softmax(alpha.detach(), dim=-1).cpu()
            edges, e = [], 0
            for i in range(2, 2 + self.steps):
                rows = w[e: e + i]
                strength = [max(float(r[k]) for k in range(len(PRIMITIVES)) if k != none) for r in rows]
                for j in sorted(range(i), key=lambda j: -strength[j])[:2]:
                    k = max((k for k in range(len(PRIMITIVES)) if k != none), key=lambda k: float(rows[j][k]))
                    edges.append((PRIMITIVES[k], j, i))
                e += i
            return edges

        return Genotype.from_edges(parse(self.alphas_normal), parse(self.alphas_reduce))


class Darts:
    """The bilevel alternation. `epoch(train_loader, val_loader, lr)` runs one pass; `order` 1 or 2."""

    def __init__(
        self, net: SearchNetwork, lr: float = 0.025, momentum: float = 0.9, weight_decay: float = 3e-4,
        arch_lr: float = 3e-4, arch_weight_decay: float = 1e-3, grad_clip: float = 5.0, order: int = 1,
    ) -> None:
        if order not in (1, 2):
            raise ValueError(f"DARTS order must be 1 or 2, got {order}")
        self.net, self.order, self.grad_clip = net, order, grad_clip
        self.w_opt = torch.optim.SGD(net.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.a_opt = torch.optim.Adam(net.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999),
                                      weight_decay=arch_weight_decay)

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "w_opt": self.w_opt.state_dict(), "a_opt": self.a_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.a_opt.load_state_dict(state["a_opt"])

    def _arch_step_second_order(self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                                xi: float) -> None:
        net, ws = self.net, self.net.weight_parameters()
        backup = [w.detach().clone() for w in ws]
        gw = torch.autograd.grad(F.cross_entropy(net(xt), yt), ws)
        with torch.no_grad():  # one virtual SGD step w' = w - xi * grad
            for w, g in zip(ws, gw):
                w.sub_(xi * g)
        val = F.cross_entropy(net(xv), yv)
        g_all = torch.autograd.grad(val, net.arch_parameters() + ws)
        ga, dw = g_all[:2], g_all[2:]
        r = 1e-2 / (torch.sqrt(sum((d * d).sum() for d in dw)) + 1e-12)
        hv = []
        for sign in (1.0, -2.0):  # w + r dw, then w - r dw; the difference of ∂L_train/∂α approximates H·dw
            with torch.no_grad():
                for w, b, d in zip(ws, backup, dw):
                    w.copy_(b + (r * d if sign > 0 else -r * d))
            hv.append(torch.autograd.grad(F.cross_entropy(net(xt), yt), net.arch_parameters()))
        with torch.no_grad():
            for w, b in zip(ws, backup):
                w.copy_(b)
        for a, g, hp, hm in zip(net.arch_parameters(), ga, hv[0], hv[1]):
            a.grad = g - xi * (hp - hm) / (2 * r)

    def epoch(self, train: Any, val: Any, lr: float) -> dict[str, float]:
        """One pass: for each (train, val) batch pair, an α step on validation, then a w step on training."""
        net = self.net
        for g in self.w_opt.param_groups:
            g["lr"] = lr
        net.train()
        device = net.alphas_normal.device
        total, correct, n = 0.0, 0, 0
        for (xt, yt), (xv, yv) in zip(train, val):
            xt, yt, xv, yv = xt.to(device), yt.to(device), xv.to(device), yv.to(device)
            self.a_opt.zero_grad(set_to_none=True)
            if self.order == 1:
                F.cross_entropy(net(xv), yv).backward(inputs=net.arch_parameters())
            else:
                self._arch_step_second_order(xt, yt, xv, yv, lr)
            self.a_opt.step()
            self.w_opt.zero_grad(set_to_none=True)
            out = net(xt)
            loss = F.cross_entropy(out, yt)
            loss.backward(inputs=net.weight_parameters())
            nn.utils.clip_grad_norm_(net.weight_parameters(), self.grad_clip)
            self.w_opt.step()
            total += float(loss.detach()) * len(yt)
            correct += int((out.argmax(1) == yt).sum())
            n += len(yt)
        return {"train_loss": total / max(n, 1), "train_acc": correct / max(n, 1)}
