"""Cost of one growth step for every method, side by side in one process (issues 3, 4 and 6 suite C).

For each method: time of one growth decision + apply ÷ time of one training epoch of the same model on
the same data, and peak memory of the growth step ÷ peak memory of a training step (each measured in a
fresh subprocess: CPU resident set sampled every 0.5 ms, peak above the same baseline, or CUDA max_memory_allocated).

    python benchmarks/growth_cost.py --preset paper-vgg19   # VGG-19, 16 channels, 5,000 32x32 images
    python benchmarks/growth_cost.py --preset paper-vgg19-50k   # the same on CIFAR-10's 50,000 (minutes)
    python benchmarks/growth_cost.py --preset quick          # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from firefly_descent import cost
from firefly_descent.methods import make_grower
from firefly_descent.models import build_model

PRESETS = {
    "paper-vgg19": dict(model="vgg19", width=16, images=5000, size=32, channels=3, batch=128),
    # the same model and batch on CIFAR-10's 50,000 training images: the paper's epoch (391 steps), over which
    # the growth step's fixed costs (analysis, verification, floors on its samples) are spread
    "paper-vgg19-50k": dict(model="vgg19", width=16, images=50000, size=32, channels=3, batch=128),
    # the same model and batch on 512 images: the same per-step peak memory in minutes, for memory ratios
    # (its growth ÷ epoch ratio is not the paper setup's: the epoch is 10x shorter)
    "paper-vgg19-512": dict(model="vgg19", width=16, images=512, size=32, channels=3, batch=128),
    "fashion-vgg11": dict(model="vgg11", width=8, images=10000, size=28, channels=1, batch=128),
    "quick": dict(model="vgg11", width=4, images=256, size=28, channels=1, batch=64),
}
METHODS = {
    "firefly": ("firefly", {}),
    "firefly-paper-code": ("firefly", {"preset": "paper-code"}),
    "firefly-paper-code-whole-batches": ("firefly", {"preset": "paper-code", "micro_batch": None}),
    "net2net": ("net2net", {}),
    "random": ("random", {}),
    "splitting-exact": ("splitting-exact", {}),
    "splitting-fast": ("splitting-fast", {}),
    "gradmax": ("gradmax", {}),
    "nash": ("nash", {}),
}


def setup(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["images"], cfg["channels"], cfg["size"], cfg["size"], generator=gen)
    y = torch.randint(0, 10, (cfg["images"],), generator=gen)
    loader = [
        (x[i : i + cfg["batch"]].to(device), y[i : i + cfg["batch"]].to(device))
        for i in range(0, cfg["images"], cfg["batch"])
    ]
    model = build_model(
        cfg["model"], in_channels=cfg["channels"], num_classes=10, widths=cfg["width"], input_size=cfg["size"]
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, loader, device


def train_epoch(model, opt, loader) -> float:
    model.train()
    t0 = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def current_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator high-water mark, or on CPU the resident set
    sampled every 0.5 ms by a thread (torch releases the GIL inside ops, so the sampler sees their peaks)."""

    def __enter__(self) -> PeakMemory:
        self.base = current_bytes()
        self.peak = self.base
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, current_bytes())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def memory_probe(cfg: dict, what: str, methods: dict[str, tuple[str, dict]] | None = None) -> int:
    """Run in a fresh process: peak memory above the resident baseline (model and data loaded, nothing run)
    during one training step or one growth step. Measured from cold in both cases: a warm-up would leave
    freed blocks in the resident set and hide the training step's own peak. `what` is "train" or a method
    name looked up in `methods` ({name: (grower, kwargs)}; default `METHODS`), so a caller such as
    benchmarks/suites.py passes its own methods instead of writing into `METHODS`."""
    model, opt, loader, _ = setup(cfg)
    with PeakMemory() as mem:
        if what == "train":
            train_epoch(model, opt, loader[:1])
        else:
            name, kw = (METHODS if methods is None else methods)[what]
            make_grower(name, **kw).grow(model, loader, F.cross_entropy, optimizer=opt)
    return mem.delta


class CountFlopCounts:
    """How many times the growth step runs the FLOP counter (any model) and grows a meta copy to cost a
    plan: deterministic, unlike the times."""

    def __enter__(self) -> CountFlopCounts:
        self.flop_counts = 0
        self._enter = FlopCounterMode.__enter__
        self._meta = cost.MEASUREMENTS["meta_applies"]

        def enter(counter: FlopCounterMode) -> FlopCounterMode:
            self.flop_counts += 1
            return self._enter(counter)

        FlopCounterMode.__enter__ = enter  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        FlopCounterMode.__enter__ = self._enter  # type: ignore[method-assign]
        self.meta_applies = cost.MEASUREMENTS["meta_applies"] - self._meta


def measure_growth(cfg: dict, grower_name: str, kw: dict, seed: int = 0) -> dict:
    """One warm-up, one timed training epoch, one timed growth step, one epoch after growth."""
    model, opt, loader, _ = setup(cfg, seed)
    train_epoch(model, opt, loader[:2])  # warm-up
    epoch = train_epoch(model, opt, loader)
    with CountFlopCounts() as counted:
        t0 = time.perf_counter()
        report = make_grower(grower_name, **kw).grow(model, loader, F.cross_entropy, optimizer=opt)
        grow = time.perf_counter() - t0
    epoch_after = train_epoch(model, opt, loader)
    return {
        "epoch_s": epoch,
        "growth_s": grow,
        "growth_over_epoch": grow / epoch,
        "epoch_after_growth_s": epoch_after,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "timings": report.timings,
        # the rest of the step: analysis, FLOP counts, losses before/after, sizing
        "untimed_s": grow - sum(report.timings.values()),
        "flop_counts": counted.flop_counts,
        "meta_applies": counted.meta_applies,
        "outcome": report.outcome,
        "cost_estimate": report.extra.get("cost"),  # Firefly's FLOP-based sizing (None for other methods)
        "check_batches": report.safety.check_batches if report.safety else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper-vgg19", choices=sorted(PRESETS))
    ap.add_argument("--methods", default="firefly,firefly-paper-code")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    if args._probe:
        print(memory_probe(cfg, args._probe))
        return
    methods = [m for m in args.methods.split(",") if m]
    results = {
        "command": " ".join(["python"] + sys.argv),
        "preset": args.preset,
        "config": cfg,
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "methods": {},
    }
    for name in methods:
        grower_name, kw = METHODS[name]
        row = measure_growth(cfg, grower_name, kw)
        epoch, grow = row["epoch_s"], row["growth_s"]
        if not args.no_memory:
            probe = [sys.executable, __file__, "--preset", args.preset, "--_probe"]
            train_mem = int(subprocess.check_output(probe + ["train"], text=True).strip().splitlines()[-1])
            grow_mem = int(subprocess.check_output(probe + [name], text=True).strip().splitlines()[-1])
            row.update(
                train_step_peak_bytes=train_mem,
                growth_peak_bytes=grow_mem,
                growth_over_train_memory=grow_mem / max(1, train_mem),
            )
        results["methods"][name] = row
        print(
            f"{name:20s} epoch {epoch:7.2f}s  growth {grow:8.2f}s  ratio {grow / epoch:7.2f}"
            + (f"  memory x{row['growth_over_train_memory']:.2f}" if "growth_over_train_memory" in row else ""),
            flush=True,
        )
        phases = {**row["timings"], "rest": row["untimed_s"]}
        print(
            f"{'':20s} "
            + ", ".join(f"{k} {v:.2f}s ({v / epoch:.2f} ep)" for k, v in phases.items())
            + f"; FLOP counts {row['flop_counts']}, meta applies {row['meta_applies']}, {row['outcome']}",
            flush=True,
        )
    out = args.out or f"benchmarks/results/growth_cost_{args.preset}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
