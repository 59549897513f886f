"""One growth step on models a user would grow, measured on data no decision saw.

For each (model, method, amplitude mode, seed): train one epoch on a Fashion-MNIST slice
(tests/safety_cases.py), grow once, record the safeguard's outcome, the predicted and held-out loss
changes, the test loss/accuracy right after growth and after one more epoch of training. Resumable:
one JSON file per case under benchmarks/results/safety/; `--table` prints the markdown summary.

    python benchmarks/safety_probe.py --models mlp vgg11-bn-linear vgg19-bn our-resnet18 \
        --methods firefly --amplitudes step-one line-search --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the cases are shared with tests/test_safety.py

from safety_cases import evaluate, pretrained, run_case  # noqa: E402

from firefly_descent.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "safety"


def fine_tune(outcome, seed: int) -> tuple[float, float]:
    """One epoch of SGD after growth (the optimizer the grower remapped; the same batch order for every
    method of a seed), then test (loss, acc)."""
    _, loader, test_batches, _ = pretrained(outcome.case, seed)
    model, opt = outcome.model, outcome.optimizer
    order = torch.utils.data.DataLoader(
        loader.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed + 7)
    )
    torch.manual_seed(seed + 7)
    model.train()
    for x, y in order:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return evaluate(model, test_batches)


def run(model_name: str, method: str, amplitude: str, seed: int, options: dict) -> dict:
    t0 = time.perf_counter()
    o = run_case(model_name, method, seed=seed, amplitude=amplitude, predicted_mode=True, **options)
    o.case = model_name
    r = o.report
    tuned = fine_tune(o, seed)
    return {
        "model": model_name,
        "method": method,
        "amplitude_mode": amplitude,
        "options": options,
        "seed": seed,
        "outcome": r.outcome,
        "amplitude": r.safety.amplitude,
        "predicted": r.predicted_loss_change,
        "heldout_change_train_mode": r.heldout_loss_change,
        "heldout_change_eval_old_stats": r.heldout_predicted_mode_change,
        "params": [r.params_before, r.params_after],
        "test_before": list(o.test_before),
        "test_after_growth": list(o.test_after),
        "test_after_1_epoch": list(tuned),
        "wall_s": time.perf_counter() - t0,
    }


def table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    out = [
        "| model | method | amplitude | seed | outcome (amp) | predicted | held-out Δ train / eval | "
        "test loss before → after → +1 epoch | test acc before → after → +1 epoch | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.4f}"

    for r in rows:
        (lb, ab), (la, aa), (lt, at) = r["test_before"], r["test_after_growth"], r["test_after_1_epoch"]
        amp = "–" if r["amplitude"] is None else f"{r['amplitude']:g}"
        opts = "".join(f" {k}={v}" for k, v in r.get("options", {}).items())
        out.append(
            f"| {r['model']} | {r['method']}{opts} | {r['amplitude_mode']} | {r['seed']} | {r['outcome']} ({amp}) | "
            f"{f(r['predicted'])} | {f(r['heldout_change_train_mode'])} / {f(r['heldout_change_eval_old_stats'])} | "
            f"{lb:.4f} → {la:.4f} → {lt:.4f} | {ab:.1%} → {aa:.1%} → {at:.1%} | "
            f"{r['params'][0]:,} → {r['params'][1]:,} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "vgg11-bn-linear", "vgg19-bn", "our-resnet18"])
    p.add_argument("--methods", nargs="+", default=["firefly"])
    p.add_argument("--amplitudes", nargs="+", default=["step-one", "line-search"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="grower option (value parsed as YAML), e.g. --option bn_mode=batch; names the result files",
    )
    p.add_argument("--table", action="store_true", help="print the markdown table of stored results and exit")
    a = p.parse_args()
    if a.table:
        print(table())
        return
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.option)}
    tag = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    for seed in a.seeds:
        for model_name in a.models:
            for method in a.methods:
                for amp in a.amplitudes:
                    path = RESULTS / f"{model_name}-{method}{tag}-{amp}-s{seed}.json"
                    if path.exists():
                        continue
                    rec = run(model_name, method, amp, seed, options)
                    rec["command"] = "python " + " ".join(sys.argv)
                    atomic_write_text(path, json.dumps(rec, indent=1))
                    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
