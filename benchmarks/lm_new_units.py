"""What Firefly's new MLP units look like next to random ones (issue 23, item 6, a diagnostic of lm_growth.py).

The lm_growth benchmark's GPT-2 is trained 500 steps (seed 0, as there), then grown once from the same state by
Firefly (`candidates="all"`, a 20,000-parameter budget) and by random growth placing 200 units in the first
block's MLP. For the new columns of that MLP's `c_fc` against its old ones: the RMS of the incoming weights, the
mean |cosine| between units, and the share of the three largest singular values of the new rows.

    python benchmarks/lm_new_units.py   # prints and writes benchmarks/results/lm/new_units.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lm_growth as lm  # noqa: E402

from firefly_descent.methods import make_grower  # noqa: E402


def unit_stats(weight: torch.Tensor, old_width: int) -> dict[str, float]:
    """`weight`: a GPT-2 Conv1D weight [in, out]; units are columns, the first `old_width` old."""
    old, new = weight[:, :old_width].T, weight[:, old_width:].T

    def mean_abs_cos(a: torch.Tensor) -> float:
        a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)
        c, n = a @ a.T, a.shape[0]
        return float((c.abs().sum() - n) / (n * (n - 1)))

    s = torch.linalg.svdvals(new)
    return {
        "new_units": int(new.shape[0]),
        "rms_old": float(old.pow(2).mean().sqrt()),
        "rms_new": float(new.pow(2).mean().sqrt()),
        "mean_abs_cos_old": mean_abs_cos(old),
        "mean_abs_cos_new": mean_abs_cos(new),
        "top3_singular_share_new": float(s[:3].pow(2).sum() / s.pow(2).sum()),
    }


def main() -> int:
    torch.set_num_threads(1)
    cd = lm.CharData(*lm.read_corpus(lm.CORPUS))
    model = lm.gpt2(cd.vocab, 64, 32, 2, 2, 0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(500):
        for group in opt.param_groups:
            group["lr"] = lm.lr_at(step, 3000)
        x, y = cd.batch(cd.train, 32, 64, gen)
        opt.zero_grad()
        lm.next_token_loss(model(x), y).backward()
        opt.step()
    data = [cd.batch(cd.train, 32, 64, gen) for _ in range(12)]
    width = model.transformer.h[0].mlp.c_fc.nf
    out = {}
    for name, kw in (
        ("firefly", {"candidates": "all"}),
        ("random", {"placement": [{"transformer.h.0.mlp.c_fc": 200}]}),
    ):
        grown = copy.deepcopy(model)
        grower = make_grower("firefly" if name == "firefly" else "random", budget="params:20000", seed=0, **kw)
        grower.epoch_batches = 100
        grower.grow(grown, data, lm.next_token_loss)
        out[name] = unit_stats(grown.transformer.h[0].mlp.c_fc.weight.detach(), width)
        print(name, json.dumps(out[name]))
    path = HERE / "results" / "lm" / "new_units.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": "python benchmarks/lm_new_units.py", **out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
