"""Images/s and peak memory of one training epoch and of one growth step, for any config (issue 15).

Runs the real training loop's pieces in one process: build the run from a config, train one epoch
(the first, a warm-up, is not counted), then one growth step (grow + BatchNorm calibration/refresh +
test evaluation, exactly as the loop does). On CUDA the peak is `torch.cuda.max_memory_allocated`,
reset before each phase; on CPU it is not measured (use growth_cost.py's resident-set probe).

    python benchmarks/train_profile.py fashion-vgg-firefly --set train.device=cuda --set train.precision=bf16
    python benchmarks/train_profile.py digits-mlp-firefly --set train.device=cpu --epochs 1   # smoke

Prints one JSON object; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from firefly_descent.train.config import load_config
from firefly_descent.train.epochs import train_epoch
from firefly_descent.train.growth_step import grow
from firefly_descent.train.setup import prepare
from firefly_descent.train.state import Run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    ap.add_argument("--epochs", type=int, default=2, help="timed training epochs after one warm-up epoch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    setup = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(setup, Path(tmp), progress=False)
        dev = run.device
        n_train = len(setup.train_loader.dataset)
        train_epoch(run)  # warm-up: cuDNN autotuning, allocator, torch.compile
        run.epochs_done += 1
        _reset_peak(dev)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            train_epoch(run)
            run.epochs_done += 1
        _sync(dev)
        train_s = time.perf_counter() - t0
        train_peak = _peak(dev)
        params_before = run.params
        _reset_peak(dev)
        t1 = time.perf_counter()
        grow(run)
        _sync(dev)
        grow_s = time.perf_counter() - t1
        grow_peak = _peak(dev)
        train_epoch(run)  # the grown model trains (DDP/compile rebuilt)
        _sync(dev)
    result = {
        "config": cfg.name,
        "overrides": args.overrides,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "precision": cfg.train.precision,
        "compile": cfg.train.compile,
        "torch": torch.__version__,
        "train_images": n_train,
        "timed_epochs": args.epochs,
        "train_images_per_s": n_train * args.epochs / train_s,
        "train_peak_bytes": train_peak,
        "growth_method": cfg.growth.method,
        "growth_s": grow_s,
        "growth_peak_bytes": grow_peak,
        "params_before_growth": params_before,
        "params_after_growth": run.params,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
