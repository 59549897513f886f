"""Growth-engine benchmarks (issue 2): analysis time, plan-apply time, and the training-step time of a
grown model / the same architecture built directly (target <= 1.03), measured side by side.

    python benchmarks/engine_bench.py [--out benchmarks/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import firefly_descent as ff
from firefly_descent.models import build_model


def timeit(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }

    # 1. analysis time of torchvision resnet50 (224x224 example, meta-device tracing)
    r50 = torchvision.models.resnet50(weights=None)
    x224 = torch.randn(1, 3, 224, 224)
    results["analyze_resnet50_s"] = timeit(lambda: ff.analyze(r50, x224), repeat=5, warmup=1)
    results["resnet50_groups"] = len(ff.analyze(r50, x224).groups)

    # 2. time to apply a plan: widen every growable group of resnet50 by 10 % (split), with verification
    graph = ff.analyze(r50, x224)
    from firefly_descent.engine import apply, plan_widen

    sizes = {g.name: max(1, g.width // 10) for g in graph.growable()}

    def apply_once():
        m = torchvision.models.resnet50(weights=None)
        apply(m, plan_widen(graph, sizes), example_inputs=torch.randn(1, 3, 64, 64))

    build = timeit(lambda: torchvision.models.resnet50(weights=None), repeat=3, warmup=1)
    results["apply_plan_resnet50_s"] = max(0.0, timeit(apply_once, repeat=3, warmup=1) - build)

    # 3. grown model vs the same architecture built directly: training-step time ratio
    x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    grown = build_model("vgg11", in_channels=1, num_classes=10, widths=8, input_size=28)
    g = ff.analyze(grown, x[:2])
    ff.widen(grown, x[:2], {grp.name: 8 for grp in g.growable()}, mode="split")
    ff.widen(grown, x[:2], {grp.name: 8 for grp in ff.analyze(grown, x[:2]).growable()}, mode="zero")
    direct = build_model("vgg11", in_channels=1, num_classes=10, widths=24, input_size=28)
    assert [p.shape for p in grown.parameters()] == [p.shape for p in direct.parameters()]
    step_g, step_d = train_step_fn(grown, x, y), train_step_fn(direct, x, y)
    ratios, tg, td = [], [], []
    for _ in range(args.repeat):  # interleaved so drift in machine load hits both equally
        a = timeit(step_g, repeat=1, warmup=0)
        b = timeit(step_d, repeat=1, warmup=0)
        tg.append(a), td.append(b), ratios.append(a / b)
    results["train_step_grown_s"] = statistics.median(tg)
    results["train_step_direct_s"] = statistics.median(td)
    results["train_step_ratio_grown_over_direct"] = statistics.median(ratios)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
