"""Firefly's options: `FireflyConfig` (every knob of the method) and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CANDIDATE_SETS = ("width", "splits", "new", "depth", "all")
SCORE_PATHS = ("joint", "per-candidate")


@dataclass
class FireflyConfig:
    """All knobs of the method; `PRESETS` holds named defaults."""

    candidates: str = "width"  # width | splits | new | depth | all  (ablation switches)
    # new-unit candidates per group: a fraction of its width (< 1), a count (>= 1), or "auto": half its width
    # and at least twice the group's share of the budget, so selection always has a choice to make
    new_units: float | str = "auto"
    depth_after: list[str] | None = None  # new-layer boundaries; None = after each block/activation
    # the residual body of a depth candidate: "auto" = a block of the model's own kind (depthwise-separable
    # for MobileNetV1, basic block for ResNets, conv-BN-ReLU for VGG, Linear-act for MLPs, a copy of a pre-norm
    # transformer block with its residual outputs at zero), "layer" = one conv-BN-ReLU / Linear-act layer, or a
    # block type ("conv_bn_act", "dwsep", "basic_block", "copy")
    depth_block: str = "auto"
    # step one: `step_one_steps` optimiser steps (None = one pass) over `step_one_batches` fresh growth
    # batches (None = one per step; all the growth data leaves after the score and check batches when
    # steps is None too)
    step_one_steps: int | None = 10
    step_one_batches: int | None = None
    # samples of each batch used in steps one and two: a count, or None = as many as `cost_limit` affords
    sample_size: int | None = None
    # the whole growth step (steps one and two on the over-grown net, the safeguard's check) costs at most
    # this many training epochs, estimated from FLOPs: more samples per step when the over-grown net is
    # cheap, fewer on a big one (at least `min_samples`); None = whole batches, no limit
    cost_limit: float | None = 0.5
    min_samples: int = 16
    # score on batches step one never saw ("fresh", drawn first) or on step one's own ("step-one": the
    # authors' code; an in-sample score overstates the gain)
    score_on: str = "fresh"
    # forward/backward each batch in chunks of at most this many samples in steps one and two: the same
    # gradients with BatchNorm frozen (bn_mode="frozen"; with "batch" each chunk has its own statistics;
    # the loss must be a mean over samples), a fraction of the
    # over-grown network's activation memory. None = whole batches.
    micro_batch: int | None = None
    step_one_optimizer: str = "adam"  # adam | rmsprop | sgd
    # step one's learning rate, in relative units with Adam: ~lr per step, so ~10 steps reach the radii
    lr: float = 3e-2
    rmsprop_alpha: float = 0.9
    momentum: float = 0.1
    split_penalty: float = 1e-2  # L2 penalty on split directions
    new_penalty: float = 1e-4  # L2 penalty on new incoming weights
    max_norm: float | None = None  # optional per-candidate norm projection after each step (absolute)
    # the neighbourhood in units of the layer's own weights (relative=True): candidate values are stored
    # as multiples of the RMS of the existing units' slices, so inits, Adam's steps and the radii mean the
    # same on every layer whatever its fan-in; after each step-one step every candidate is projected back
    # into its ball (per-unit RMS <= radius), the paper's ||eps||_inf <= eps, ||delta|| <= 1
    relative: bool = True
    # BatchNorm during steps one and two: "frozen" (eval mode, the paper's code) or "batch" (batch statistics,
    # running statistics untouched: candidates are fitted and scored in the mode training continues in, so a
    # gain that BatchNorm would normalise away is not counted; new channels are then not calibrated)
    bn_mode: str = "batch"
    split_radius: float | None = 0.5  # split step eps*delta: at most this fraction of the unit's own RMS
    new_in_radius: float | None = 2.0  # new incoming weights: at most this many times an existing unit's RMS
    new_out_radius: float | None = 0.5  # new outgoing weights: at most this fraction of existing outgoing RMS
    init_split: float = 0.1  # split directions ~ N(0, a^2) relative (U(-a, a) absolute)
    init_new_in: float = 0.5  # new incoming ~ N(0, a^2)
    init_new_out: float = 0.1  # new outgoing ~ U(-a, a)
    init_layer_scale: float = 0.01
    score_points: list[float] = field(default_factory=lambda: [0.25, 0.75])  # alpha along 0 -> eps
    # step two's path (issue 26): "joint" = every gate moves together along one alpha path (alpha at
    # `score_points`, one backward per point gives all candidates' gradients); "per-candidate" = the paper's
    # s_i: candidate i's gate goes 0 -> 1 with every other candidate held on (at its eps~), i.e. the loss
    # change of switching i on with the rest on. Costs one or more extra passes per candidate (see
    # `per_candidate_points`), beyond `cost_limit` (which sizes steps one and two of the joint path only)
    score_path: str = "joint"
    # "per-candidate" only: None = the exact integral, L(all on) - L(all on but i off) by the fundamental
    # theorem of calculus (one forward per candidate and score batch, no backward); n = the n-point midpoint
    # rule on dL/dg_i along i's own path (n forward+backward passes per candidate and batch; tends to the
    # exact value as n grows)
    per_candidate_points: int | None = None
    # "per-candidate" only: rescore just the top candidates of the joint score (a count >= 1, or a fraction
    # of all candidates < 1; None = all); the others keep their joint score
    score_top: float | None = None
    score_batches: int | None = 2  # None = one pass over the data
    allow_increase: bool = False
    # trim a params:N selection until the exact parameter increase fits (cross terms between adjacent groups
    # counted): None = only when depth candidates compete (width-only selection stays as it was)
    exact_params: bool | None = None
    seed: int = 0


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the authors' released code (klightz/Firefly): one pass of RMSprop, gradient at the end point
    "paper-code": dict(
        new_units=70,
        step_one_steps=None,
        step_one_optimizer="rmsprop",
        lr=1e-3,
        rmsprop_alpha=0.9,
        momentum=0.1,
        split_penalty=1e-2,
        new_penalty=1e-4,
        relative=False,
        bn_mode="frozen",
        split_radius=None,
        new_in_radius=None,
        new_out_radius=None,
        init_split=0.1,
        init_new_in=0.1,
        init_new_out=0.01,
        score_points=[1.0],
        score_batches=None,
        score_on="step-one",
        cost_limit=None,  # whole batches over the whole growth data, whatever it costs
        # the authors' code runs whole batches; chunking gives the same gradients with the over-grown
        # net's (16 + 16 twins + 70 new channels per layer) activations held for 32 samples at a time
        micro_batch=32,
    ),
}


def midpoints(n: int) -> list[float]:
    """alpha_k = (2k - 1) / (2n), k = 1..n: the midpoint rule for the path integral."""
    return [(2 * k - 1) / (2 * n) for k in range(1, n + 1)]
