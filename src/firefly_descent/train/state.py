"""The state of one run and its checkpoints: what a checkpoint holds and how a run continues from one.

`Run` holds the mutable state (model, optimizer, schedule, scaler, counters, metrics, growth records)
and the growth-schedule bookkeeping; `save_checkpoint` / `load_state` turn it into a `weights_only`
checkpoint and back. Every checkpoint stores all RNG states (torch, CUDA, numpy, python, DataLoader
generator), so a resumed run continues bit-for-bit like an uninterrupted one on the same machine.
`growth_step.grow` and `epochs.run_epochs` are the operations on a run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine import growth_history, replay_history
from .checkpoint import (
    FORMAT,
    VERSION,
    atomic_save,
    capture_rng,
    checkpoint_path,
    jsonable,
    prune_checkpoints,
    restore_rng,
)
from .config import config_to_dict
from .device import loader_generator
from .metrics import flops_per_example, make_loss, param_count
from .rundir import CheckpointError, RunDir
from .runtime import Runtime
from .schedule import LRSchedule, make_optimizer
from .setup import RunSetup

__all__ = ["Run"]


class Run:
    """Mutable state of one run (build with `train`/`resume`, or from a `prepare`d setup for benchmarks)."""

    def __init__(
        self, setup: RunSetup, run_dir: Path, progress: bool, callbacks: Sequence[Any] = (), rt: Runtime | None = None
    ) -> None:
        self.rt = rt if rt is not None else Runtime()  # one process, or one rank (train/runtime.py)
        self.rt.configure(setup)
        self.s = setup
        self.callbacks = list(callbacks)
        self.cfg = setup.cfg
        self.run_dir = Path(run_dir)
        self.files = RunDir(self.run_dir, self.rt.is_main)
        self.model = setup.model
        self.device = setup.device
        self.optimizer = make_optimizer(self.model.parameters(), self.cfg.optim)
        self.amp = self.rt.mode  # autocast mode: None (fp32), "bf16" or "fp16"
        self.scaler = self.rt.scaler()
        self.loss_fn = make_loss(setup.task, self.cfg.optim.label_smoothing)
        self.loader_gen = loader_generator(setup.train_loader)
        self.epochs_done = 0
        self.growth_done_for_epoch = True  # no growth is pending at the start
        self.step = 0
        self.num_growths = 0
        self.elapsed = 0.0
        self.seq = 0
        self.metrics: list[dict[str, Any]] = []
        self.growths: list[dict[str, Any]] = []
        self.progress = bool(progress) and sys.stderr.isatty() and self.rt.is_main
        self.progress_lines = bool(progress) and not sys.stderr.isatty() and self.rt.is_main  # redirected output
        self.params = param_count(self.model)
        self.flops = flops_per_example(self.model, setup.example_inputs)
        self.schedule = LRSchedule.from_config(self.cfg, self.phase_end(0))

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        """Call every callback's `event` method with the payload (the dict also written to disk)."""
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if callable(fn):
                fn(payload, self.model)

    def log(self, line: str) -> None:
        """A log line on stdout and in ``train.log`` (main process only)."""
        self.files.log(line)

    def measure(self, flops: int | None = None) -> None:
        """Count the model's parameters and FLOPs again (after growth or a restore); `flops`: the count a
        grower already made of the grown model (its report's ``flops_after``), used instead of a second count."""
        self.params = param_count(self.model)
        self.flops = int(flops) if flops is not None else flops_per_example(self.model, self.s.example_inputs)

    # ---- growth schedule

    def may_grow_more(self) -> bool:
        """False once the model reached ``growth.max_params`` or ``growth.max_flops``."""
        g = self.cfg.growth
        if g.max_params is not None and self.params >= g.max_params:
            return False
        if g.max_flops is not None and self.flops is not None and self.flops >= g.max_flops:
            return False
        return True

    def growth_due(self) -> bool:
        """Whether a planned growth follows the epochs done so far."""
        n, planned = self.num_growths, self.s.planned
        return n < len(planned) and planned[n] == self.epochs_done and self.may_grow_more()

    def next_planned(self, after: int) -> int | None:
        """The next planned growth epoch after `after`, or None."""
        for e in self.s.planned[self.num_growths :]:
            if e > after:
                return e
        return None

    def phase_end(self, start: int) -> int:
        """End of the LR phase starting at epoch `start` (0-based training epoch index)."""
        if not self.cfg.schedule.restart_after_growth:
            return self.cfg.train.epochs
        nxt = self.next_planned(start)
        if nxt is None or not self.may_grow_more():
            return self.cfg.train.epochs
        return nxt

    # ---- optimizer after growth

    def param_names(self) -> list[list[str]]:
        """The optimizer's parameters by model name, per param group (how a checkpoint stores the layout)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = []
        for group in self.optimizer.param_groups:
            try:
                out.append([names[id(p)] for p in group["params"]])
            except KeyError:
                raise RuntimeError(
                    "the optimizer holds a parameter that is no longer in the model; "
                    "the grower must remap the optimizer (engine.apply(..., optimizer=...))"
                ) from None
        return out

    def sync_optimizer(self) -> None:
        """After growth: add model parameters the grower did not register with the optimizer."""
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.model.parameters() if id(p) not in known]
        if missing:
            self.optimizer.add_param_group({"params": missing})
        self.param_names()  # raises if stale parameters remain

    # ---- checkpoints

    def grower_state(self) -> Any:
        """The grower's own state (e.g. a running budget), if it has any."""
        fn = getattr(self.s.grower, "state_dict", None)
        return fn() if callable(fn) else None

    def save_checkpoint(self, after_growth: bool = False) -> Path:
        """Write an atomic checkpoint of the whole run state and prune old ones."""
        self.seq += 1
        path = checkpoint_path(self.run_dir, self.seq, self.epochs_done, after_growth)
        if not self.rt.is_main:
            return path
        ckpt = {
            "format": FORMAT,
            "version": VERSION,
            "config": jsonable(config_to_dict(self.cfg)),
            "model": {"name": self.cfg.model.name, "kwargs": jsonable(self.s.model_kwargs)},
            "model_state": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "growth_history": jsonable(growth_history(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "optim_param_names": self.param_names(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "grower_state": self.grower_state(),
            "rng": capture_rng(self.loader_gen),
            "epoch": self.epochs_done,
            "grown": self.growth_done_for_epoch,
            "step": self.step,
            "num_growths": self.num_growths,
            "elapsed": self.elapsed,
            "seq": self.seq,
            "metrics": jsonable(self.metrics),
            "growth_reports": jsonable(self.growths),
            "example_inputs": self.s.example_inputs.detach().cpu(),
            "dataset": {
                "name": self.s.bundle.name,
                "input_shape": [int(v) for v in self.s.bundle.input_shape],
                "num_classes": int(self.s.bundle.num_classes),
                "task": self.s.task,
            },
            "torch_version": str(torch.__version__),
        }
        atomic_save(ckpt, path)
        prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Restore everything from a checkpoint onto the freshly prepared setup."""
        history = ckpt.get("growth_history") or []
        if history:
            replay_history(self.model, history)
        try:
            self.model.load_state_dict(ckpt["model_state"])
        except RuntimeError as e:
            raise CheckpointError(
                f"{ckpt.get('path')}: weights do not fit the rebuilt model ({' '.join(str(e).split())[:300]})"
            ) from None
        self.model.to(self.device)
        named = dict(self.model.named_parameters())
        groups = [{"params": [named[n] for n in names]} for names in ckpt["optim_param_names"]]
        self.optimizer = make_optimizer(groups, self.cfg.optim)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("grower_state") is not None and callable(getattr(self.s.grower, "load_state_dict", None)):
            self.s.grower.load_state_dict(ckpt["grower_state"])
        self.epochs_done = int(ckpt["epoch"])
        self.growth_done_for_epoch = bool(ckpt["grown"])
        self.step = int(ckpt["step"])
        self.num_growths = int(ckpt["num_growths"])
        self.elapsed = float(ckpt["elapsed"])
        self.seq = int(ckpt["seq"])
        self.metrics = list(ckpt["metrics"])
        self.growths = list(ckpt["growth_reports"])
        self.measure()
        self.files.rewrite_jsonl("metrics.jsonl", self.metrics)
        self.files.rewrite_jsonl("growth.jsonl", self.growths)
        restore_rng(ckpt["rng"], self.loader_gen)
