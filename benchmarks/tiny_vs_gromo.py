"""Cross-check of our TINY grower against the peer, GroMo 0.1.0 (`pip install -e .[peers]`).

Both libraries grow the same MLP (same weights, same batches, float64, ReLU) by one TINY step; we compare,
per hidden layer, the singular values λ_k of S^{-1/2} N, the first-order improvements (new neurons
σ'(0)·Σλ², existing-weight update tr(M δW*)), and the span of the added incoming (α, with bias) and outgoing
(ω) weights by their principal angles. GroMo's statistics are means over samples of a *summed* loss's
gradient, ours of the per-sample gradient: with `reduction="sum"` on GroMo's side the two are the same
quantity (see the TINY docstring). Only the top r neurons are compared, r = how many GroMo keeps (it
drops λ < 1e-3).

`compare_conv` does the same for a Conv2d(3×3) -> ReLU -> Conv2d(3×3, stride 2) pair against GroMo's
FullConv2dGrowingModule (whose S sums B Bᵀ over the consumer's kernel offsets, as ours does). GroMo builds
float32 probes internally, so that comparison runs with float64 as the default dtype.

    PYTHONPATH=src python benchmarks/tiny_vs_gromo.py --seeds 5
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from firefly_descent.methods.baselines.tiny import TINY


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians) between the column spans of a and b."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    s = torch.linalg.svdvals(qa.transpose(0, 1) @ qb).clamp(-1.0, 1.0)
    return torch.arccos(s)


def compare(seed: int = 0, sizes: tuple[int, ...] = (40, 16, 16, 10), n: int = 256, batches: int = 2) -> dict[str, Any]:
    """One growth step of GroMo and of ours on the same MLP and data; per-layer comparison numbers."""
    from gromo.containers.growing_mlp import GrowingMLP

    torch.manual_seed(seed)
    d_in, *hidden, d_out = sizes
    if len(set(hidden)) != 1:
        raise ValueError("GroMo's GrowingMLP has equal hidden widths")
    peer = GrowingMLP(d_in, d_out, hidden[0], number_hidden_layers=len(hidden), activation=nn.ReLU()).double()
    layers: list[nn.Module] = []
    for i, gl in enumerate(peer.layers):
        lin = nn.Linear(gl.layer.in_features, gl.layer.out_features).double()
        with torch.no_grad():
            lin.weight.copy_(gl.layer.weight)
            lin.bias.copy_(gl.layer.bias)
        layers.append(lin)
        if i < len(peer.layers) - 1:
            layers.append(nn.ReLU())
    ours = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(1000 + seed)
    data = [(torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, d_out, (n,), generator=g))
            for _ in range(batches)]
    with torch.no_grad():
        assert torch.equal(peer(data[0][0]), ours(data[0][0]))

    peer.init_computation()
    for x, y in data:
        peer.zero_grad()
        F.cross_entropy(peer(x), y, reduction="sum").backward()
        peer.update_computation()
    peer.compute_optimal_updates(dtype=torch.float64)

    grower = TINY(batches=None)
    ctx = grower.begin(ours, data, F.cross_entropy, None)
    sol = grower.analyse(ctx, grower.paths(ctx))
    out: dict[str, Any] = {"seed": seed, "sizes": list(sizes), "samples": n * batches, "layers": {}}
    for j, gl in enumerate(peer._growable_layers):
        group = str(2 * j)  # the Linear whose output units GroMo's layer j+1 grows
        tg = sol[group]
        lam_p = gl.eigenvalues_extension.detach()
        r = int(lam_p.numel())
        alpha_p = torch.cat([gl.previous_module.extended_output_layer.weight.detach(),
                             gl.previous_module.extended_output_layer.bias.detach()[:, None]], 1)  # [r, D_in+1]
        omega_p = gl.extended_input_layer.weight.detach().transpose(0, 1)  # [r, D_out]
        lam = tg.lambdas[:r]
        alpha, omega = tg.alpha[:r], tg.omega[:r]
        per_neuron_cos_a = (F.normalize(alpha, dim=1) * F.normalize(alpha_p, dim=1)).sum(1).abs()
        per_neuron_cos_o = (F.normalize(omega, dim=1) * F.normalize(omega_p, dim=1)).sum(1).abs()
        fo_new_p = float(gl.new_neurons_fo_improvement)
        fo_new = float(tg.improvement[:r].sum())
        out["layers"][group] = {
            "neurons": r,
            "lambda_rel_err": float(((lam - lam_p).abs() / lam_p.abs()).max()),
            "fo_new_neurons": [fo_new, fo_new_p],
            "fo_new_rel_err": abs(fo_new - fo_new_p) / abs(fo_new_p),
            "fo_update": [tg.delta_decrease, float(gl.parameter_update_decrease)],
            "fo_update_rel_err": abs(tg.delta_decrease - float(gl.parameter_update_decrease))
            / abs(float(gl.parameter_update_decrease)),
            "max_angle_alpha": float(principal_angles(alpha.T, alpha_p.T).max()),
            "max_angle_omega": float(principal_angles(omega.T, omega_p.T).max()),
            "min_cos_alpha": float(per_neuron_cos_a.min()),
            "min_cos_omega": float(per_neuron_cos_o.min()),
            "alpha_norm_rel_err": float(((alpha.norm(dim=1) - alpha_p.norm(dim=1)).abs() / alpha_p.norm(dim=1)).max()),
        }
    return out


def compare_conv(seed: int = 0, n: int = 32, batches: int = 2) -> dict[str, Any]:
    """One growth step of the channels between two convolutions, GroMo's FullConv2dGrowingModule vs ours."""
    from gromo.modules.conv2d_growing_module import FullConv2dGrowingModule

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        l1 = FullConv2dGrowingModule(2, 4, 3, padding=1, post_layer_function=nn.ReLU())
        l2 = FullConv2dGrowingModule(4, 5, 3, padding=1, stride=2, previous_module=l1)
        l1.next_module = l2
        head = nn.Sequential(nn.ReLU(), nn.Flatten(1), nn.Linear(5 * 4 * 4, 3))
        ours = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, stride=2), *head)
        with torch.no_grad():
            for mine, theirs in ((ours[0], l1.layer), (ours[2], l2.layer)):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
        g = torch.Generator().manual_seed(1000 + seed)
        data = [(torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(batches)]
        l2.init_computation()
        for x, y in data:
            F.cross_entropy(head(l2(l1(x))), y, reduction="sum").backward()
            l2.update_computation()
        l2.compute_optimal_updates(dtype=torch.float64)
        grower = TINY(batches=None)
        ctx = grower.begin(ours, data, F.cross_entropy, None)
        tg = grower.analyse(ctx, grower.paths(ctx))["0"]
    finally:
        torch.set_default_dtype(old)
    lam_p = l2.eigenvalues_extension.detach()
    r = int(lam_p.numel())
    ext = l1.extended_output_layer
    alpha_p = torch.cat([ext.weight.detach().flatten(1), ext.bias.detach()[:, None]], 1)  # [r, C_in*9 + 1]
    omega_p = l2.extended_input_layer.weight.detach().transpose(0, 1).reshape(r, -1)  # [r, D_out*9]
    fo_new_p, fo_upd_p = float(l2.new_neurons_fo_improvement), float(l2.parameter_update_decrease)
    return {"seed": seed, "layers": {"0": {
        "neurons": r,
        "lambda_rel_err": float(((tg.lambdas[:r] - lam_p).abs() / lam_p.abs()).max()),
        "fo_new_rel_err": abs(float(tg.improvement[:r].sum()) - fo_new_p) / abs(fo_new_p),
        "fo_update_rel_err": abs(tg.delta_decrease - fo_upd_p) / abs(fo_upd_p),
        "max_angle_alpha": float(principal_angles(tg.alpha[:r].T, alpha_p.T).max()),
        "max_angle_omega": float(principal_angles(tg.omega[:r].T, omega_p.T).max()),
        "min_cos_alpha": float((F.normalize(tg.alpha[:r], dim=1) * F.normalize(alpha_p, dim=1)).sum(1).abs().min()),
        "min_cos_omega": float((F.normalize(tg.omega[:r], dim=1) * F.normalize(omega_p, dim=1)).sum(1).abs().min()),
        "alpha_norm_rel_err": float(((tg.alpha[:r].norm(dim=1) - alpha_p.norm(dim=1)).abs()
                                     / alpha_p.norm(dim=1)).max()),
    }}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sizes", default="40,16,16,10", help="MLP widths, e.g. 40,16,16,10 (MNIST-1D suite B)")
    ap.add_argument("--samples", type=int, default=256, help="samples per batch")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--json", default=None, help="write all numbers here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = tuple(int(s) for s in a.sizes.split(","))
    rows = [compare(s, sizes, a.samples, a.batches) for s in range(a.seeds)]
    rows += [dict(compare_conv(s), seed=f"conv{s}") for s in range(a.seeds)]
    keys = ["neurons", "lambda_rel_err", "fo_new_rel_err", "fo_update_rel_err", "max_angle_alpha", "max_angle_omega",
            "min_cos_alpha", "min_cos_omega"]
    print(" seed layer " + " ".join(f"{k:>17}" for k in keys))
    worst: dict[str, float] = {}
    for row in rows:
        for name, d in row["layers"].items():
            print(f"{row['seed']:>5} {name:>5} " + " ".join(f"{d[k]:>17.3g}" for k in keys))
            for k in keys:
                v = float(d[k])
                worst[k] = min(worst.get(k, math.inf), v) if k.startswith("min") else max(worst.get(k, -math.inf), v)
    print("worst       " + " ".join(f"{worst[k]:>17.3g}" for k in keys))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "worst": worst}, f, indent=1)


if __name__ == "__main__":
    main()
