"""How the training loop executes: one process, or one of many under torch.distributed.

The loop (`train/epochs.py`, `train/growth_step.py`) only asks its `Runtime` a few questions: which
module runs the forward pass, how to reduce metric sums, how to grow, whether this process writes files.
`Runtime` answers them for one process (with precision, ``torch.compile`` and ``channels_last`` from
`train/precision.py`); `train/distributed.py`'s `DistributedRuntime` answers them for a rank of a torchrun job, and its
`runtime_for` picks the one that fits the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .metrics import evaluate
from .precision import batch_channels_last, compile_module, make_scaler, resolve_precision, to_channels_last

__all__ = ["Runtime", "under_torchrun"]


def under_torchrun() -> bool:
    """True in a process started by torchrun / torch.distributed.run (it sets these variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _signature(model: nn.Module) -> tuple[int, ...]:
    """Identity of the model's modules and parameters: changes when growth swaps any of them."""
    return tuple(id(m) for m in model.modules()) + tuple(id(p) for p in model.parameters())


class Runtime:
    """Single-process execution (the default): every hook is the identity or a plain call."""

    distributed = False
    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.mode: str | None = None
        self.device = torch.device("cpu")
        self.compile = False
        self.compile_backend = "inductor"
        self.channels_last = False
        self.example: torch.Tensor | None = None
        self.compiles = 0  # how many times a forward module was (re)built with torch.compile
        self._fwd: nn.Module | None = None
        self._sig: tuple[int, ...] | None = None
        self._configured: Any = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, metrics and checkpoints."""
        return self.rank == 0

    # ---- setup

    def configure(self, setup: Any) -> None:
        """Read precision/compile/layout options from `setup.cfg`; refuse bad ones with one line.

        Called once per setup (again is a no-op), before the run directory is written."""
        if self._configured is setup:
            return
        self._configured = setup
        self._configure(setup)

    def _configure(self, setup: Any) -> None:
        t = setup.cfg.train
        self.device = setup.device
        self.mode = resolve_precision(t.precision, t.amp, setup.device)
        self.compile = bool(t.compile)
        self.compile_backend = t.compile_backend
        self.channels_last = bool(t.channels_last)
        self.example = setup.example_inputs
        if self.channels_last:
            to_channels_last(setup.model)
            self.example = batch_channels_last(self.example)

    def scaler(self) -> Any:
        """GradScaler for fp16 on CUDA, else None."""
        return make_scaler(self.mode, self.device)

    # ---- forward module

    def wrap(self, model: nn.Module) -> nn.Module:
        """Build the forward module around `model` (subclasses add DDP); compiled if asked."""
        if self.compile:
            self.compiles += 1
            return compile_module(model, self.compile_backend, self.example)
        return model

    def forward_module(self, model: nn.Module) -> nn.Module:
        """The module to train with; rebuilt (re-wrapped, recompiled) whenever growth changed `model`."""
        sig = _signature(model)
        if self._fwd is None or sig != self._sig:
            self._fwd = None
            if self.channels_last:
                to_channels_last(model)  # new parameters from growth are created contiguous
            self._fwd = self.wrap(model)
            self._sig = sig
        return self._fwd

    def inputs(self, x: Any) -> Any:
        """A batch's input in the configured memory layout."""
        return batch_channels_last(x) if self.channels_last else x

    # ---- collective hooks (identity in one process)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a distributed sampler for `epoch` (no-op here)."""

    def reduce_sums(self, *values: float) -> tuple[float, ...]:
        """Sum per-process counters over processes."""
        return tuple(float(v) for v in values)

    reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Passed to `calibrate_new_batchnorm(reduce=...)`: sums statistics over processes (None here)."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Average refreshed BatchNorm statistics over processes (no-op here)."""

    def barrier(self) -> None:
        """Wait for every process (no-op here)."""

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every process."""
        return value

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, task: str, amp: Any) -> dict[str, Any]:
        """`metrics.evaluate` over this process's share of `loader`, combined over processes."""
        return evaluate(model, loader, device, task, amp)

    def grow(
        self,
        grower: Any,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: Any,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: Any = None,
    ) -> Any:
        """Run one growth step in fp32 (outside autocast) and return the grower's report."""
        return grower.grow(model, data, loss_fn, optimizer=optimizer, example_inputs=example_inputs)

    def close(self) -> None:
        """Release process-group resources (no-op here)."""

