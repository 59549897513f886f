"""Grow a LightningModule during `Trainer.fit`: one callback, and Lightning keeps owning the rest.

    trainer = L.Trainer(max_epochs=6, callbacks=[FireflyCallback("firefly", at=[2, 4], loss_fn=F.cross_entropy)])

What the callback does, and why each piece is where it is:

* **When.** After training epoch ``E`` (1-based, the schedule of the project's own loop): ``at=[2, 4]`` grows
  after epochs 2 and 4; ``every=N`` after ``W, W + N, ...`` with ``W = warmup`` (default ``N``); never after the
  last epoch. The step runs as epoch ``E + 1`` starts, so epoch ``E``'s validation and checkpoints all see the
  model before it, whatever hook they run in; an epoch that grew (the callback's state, saved in checkpoints)
  never grows again.
* **On what.** The grower reads batches of the trainer's train dataloader (``data=`` overrides it), turned into
  ``(inputs, targets)`` by ``batch=`` (default: a 2-tuple or a dict with ``input``/``target``-like keys). It grows
  the LightningModule itself, whose ``forward(inputs)`` must give the outputs ``loss_fn(outputs, targets)`` reads,
  or the submodule named by ``module=`` (e.g. ``module="net"``). ``loss_fn`` defaults to the module's ``loss_fn``
  or ``criterion`` attribute: a ``training_step`` cannot be reused, as it logs and may step manual optimizers.
  Growth runs under a forked RNG seeded by the grower's seed and the growth count, so it neither depends on nor
  disturbs the training randomness, and a resumed run grows exactly as an uninterrupted one.
* **Optimizers.** Every optimizer of ``trainer.optimizers`` is remapped by the engine during the step (old
  parameters keep their state at their new positions, new ones join their neighbours' param group); LR
  schedulers hold the optimizer itself, so they keep working.
* **DDP.** Under ``strategy="ddp"`` rank 0 decides and applies the plans on its shard; the other ranks receive
  the plans (pure data) and apply them through the same engine; an architecture hash is compared across ranks;
  rank 0's weights and optimizer state are broadcast; then the DDP wrapper is rebuilt over the new parameters.
* **Checkpoints.** ``on_save_checkpoint`` stores the growth history and the optimizers' parameter layout. On
  ``Trainer.fit(ckpt_path=...)`` the history is replayed on the freshly built module (from its
  ``on_load_checkpoint``, which the callback wraps in ``setup``) *before* Lightning loads the weights and before
  ``configure_optimizers`` runs, so the optimizers are built over the grown parameters; ``on_fit_start`` puts
  each optimizer's parameters in the saved order before Lightning loads the optimizer state. Strategies that
  restore after setup (FSDP, DeepSpeed) are not supported. Outside a trainer, `load_grown` rebuilds a module.
* **Logging.** Each growth report's numeric fields go to every logger of the trainer as ``firefly/<field>``;
  the reports themselves are kept in ``callback.reports``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine import growth_history
from ..engine.apply import apply
from ..errors import GrowthError
from ..methods.base import Grower, make_grower
from ..plan import Plan
from ..train.hashing import ArchitectureMismatchError, architecture_hash

__all__ = ["CHECKPOINT_KEY", "FireflyCallback", "default_batch", "load_grown", "optimizer_layouts", "replay_checkpoint"]

CHECKPOINT_KEY = "firefly_growth"  # the key of a Lightning checkpoint that holds the growth history

BatchFn = Callable[[Any], tuple[Any, Any]]
LossFn = Callable[[Any, Any], torch.Tensor]

_INPUT_KEYS = ("input", "inputs", "x", "input_ids", "pixel_values", "image", "images")
_TARGET_KEYS = ("target", "targets", "y", "label", "labels")


def default_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a ``(x, y)`` tuple/list or of a dict with input and target keys."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is not None and y is not None:
            return x, y
    raise TypeError(
        f"FireflyCallback: cannot split a training batch of type {type(batch).__name__} into (inputs, targets); "
        "pass batch=lambda b: (inputs, targets)"
    )


class _GrowthBatches:
    """A loader's batches as ``(inputs, targets)``, re-iterable, with the loader's length."""

    def __init__(self, loader: Iterable[Any], split: BatchFn) -> None:
        self.loader, self.split = loader, split

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.loader:
            yield self.split(batch)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class _JointOptimizer:
    """Several optimizers seen as one by the engine, which reads and writes only ``param_groups`` and ``state``:
    the groups are the optimizers' own dicts (edited in place); the state is merged for the step and handed back
    to each optimizer by `scatter`."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.state: dict[Any, Any] = {p: s for o in optimizers for p, s in o.state.items()}

    def scatter(self) -> None:
        for o in self.optimizers:
            held = [p for g in o.param_groups for p in g["params"]]
            o.state.clear()
            o.state.update({p: self.state[p] for p in held if p in self.state})


def optimizer_layouts(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> list[list[list[str]]]:
    """Parameter names per param group of each optimizer (what a rebuilt optimizer must follow to load the state)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[[names[id(p)] for p in g["params"] if id(p) in names] for g in o.param_groups] for o in optimizers]


def _set_optimizer_layouts(
    module: nn.Module, optimizers: Iterable[torch.optim.Optimizer], layouts: list[list[list[str]]]
) -> None:
    """Give each optimizer's param groups the saved parameters, in the saved order (Lightning loads an optimizer's
    state by position, and growth appends new parameters where a fresh `configure_optimizers` would not)."""
    named = dict(module.named_parameters())
    for o, layout in zip(optimizers, layouts):
        for g, names in zip(o.param_groups, layout):
            missing = [n for n in names if n not in named]
            if missing:
                raise ArchitectureMismatchError(
                    f"the checkpoint's optimizer holds {missing[0]!r}, which the rebuilt module does not have"
                )
            g["params"] = [named[n] for n in names]


def _submodule(pl_module: nn.Module, path: str | None) -> nn.Module:
    return pl_module.get_submodule(path) if path else pl_module


def replay_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> int:
    """Replay a Lightning checkpoint's growth history on `pl_module` (structure only: load the weights after);
    returns the number of plans applied. A module that already holds a prefix of the history gets the rest."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if not state:
        return 0
    target = _submodule(pl_module, state.get("module"))
    saved, current = list(state["history"]), growth_history(target)
    if current != saved[: len(current)]:
        raise ArchitectureMismatchError(
            f"the module already holds {len(current)} growth steps that are not the checkpoint's first ones; "
            "build it afresh before resuming"
        )
    for record in saved[len(current) :]:
        apply(target, Plan.from_dict(record), verify=False)
    return len(saved) - len(current)


def load_grown(pl_module: nn.Module, checkpoint_path: str, map_location: Any = "cpu") -> nn.Module:
    """A freshly built module grown as in the checkpoint, with its weights (``LightningModule.load_from_checkpoint``
    builds the original architecture and cannot load a grown state dict)."""
    ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    replay_checkpoint(pl_module, ckpt)
    pl_module.load_state_dict(ckpt["state_dict"])
    return pl_module


def _numeric(rec: dict[str, Any]) -> dict[str, float]:
    return {
        f"firefly/{k}": float(v)
        for k, v in rec.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN never goes to a logger
    }


class FireflyCallback(Callback):
    """Grow the model between epochs on a schedule (module docstring: data, optimizers, DDP, checkpoints)."""

    def __init__(
        self,
        method: str | Grower = "firefly",
        *,
        at: Iterable[int] | None = None,
        every: int | None = None,
        warmup: int | None = None,
        loss_fn: LossFn | None = None,
        module: str | None = None,
        batch: BatchFn | None = None,
        data: Iterable[Any] | None = None,
        example_inputs: Any = None,
        **grower_kwargs: Any,
    ) -> None:
        if (at is None) == (every is None):
            raise ValueError("FireflyCallback: give at=[epochs] or every=N (one of them)")
        if every is not None and every < 1:
            raise ValueError(f"FireflyCallback: every must be >= 1, got {every}")
        if warmup is not None and every is None:
            raise ValueError("FireflyCallback: warmup is only used with every=N")
        if isinstance(method, Grower):
            if grower_kwargs:
                raise ValueError("FireflyCallback: options go to make_grower; pass a name, or configure the grower")
            self.grower = method
        else:
            self.grower = make_grower(method, **grower_kwargs)
        self.at = sorted({int(e) for e in at}) if at is not None else None
        self.every, self.warmup = every, warmup
        self.loss_fn, self.module, self.batch, self.data = loss_fn, module, batch or default_batch, data
        self.example_inputs = example_inputs
        self.grown_after: list[int] = []  # epochs (1-based) after which this run grew
        self.reports: list[Any] = []  # GrowthReport on rank 0 (and one process), the report's dict elsewhere
        self._layouts: list[list[list[str]]] | None = None  # the checkpoint's optimizer layouts, until fit starts

    # ---- schedule ---------------------------------------------------------------------------------------------
    def grows_after(self, epoch: int, max_epochs: int | None = None) -> bool:
        """Whether the schedule grows after training epoch `epoch` (1-based) of a run of `max_epochs`."""
        if max_epochs is not None and max_epochs >= 0 and epoch >= max_epochs:
            return False
        if self.at is not None:
            return epoch in self.at
        assert self.every is not None
        start = max(self.every if self.warmup is None else self.warmup, 1)
        return epoch >= start and (epoch - start) % self.every == 0

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Make the module replay a resumed checkpoint's growth before Lightning loads its weights and builds the
        optimizers: Lightning reads the checkpoint only after `setup`, and calls the module's `on_load_checkpoint`
        right before `load_state_dict`, so the module's hook is wrapped for the run (undone in `teardown`)."""
        self._layouts = None
        if getattr(pl_module.on_load_checkpoint, "_firefly_replay", False):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            replay_checkpoint(pl_module, checkpoint)
            self._layouts = (checkpoint.get(CHECKPOINT_KEY) or {}).get("optimizer_layouts")
            original(checkpoint)

        on_load_checkpoint._firefly_replay = True  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs after `configure_optimizers` and before Lightning loads the checkpoint's optimizer state."""
        if self._layouts:
            _set_optimizer_layouts(pl_module, trainer.optimizers, self._layouts)
        self._layouts = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Growth after epoch E runs as epoch E + 1 starts: after E's validation and checkpoints (a checkpoint of
        epoch E holds the model before this growth, which a resumed run then redoes identically), before any
        loader iterator of epoch E + 1 is open."""
        epoch = trainer.current_epoch  # training epochs completed
        if epoch < 1 or epoch in self.grown_after or not self.grows_after(epoch, trainer.max_epochs):
            return
        rec = self.grow(trainer, pl_module)
        self.grown_after.append(epoch)
        metrics = _numeric(rec)
        metrics["firefly/epoch"] = float(epoch)
        metrics["firefly/growths"] = float(len(self.grown_after))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "module": self.module,
            "history": growth_history(_submodule(pl_module, self.module)),
            "optimizer_layouts": optimizer_layouts(pl_module, trainer.optimizers),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"grown_after": list(self.grown_after)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.grown_after = [int(e) for e in state_dict.get("grown_after", [])]

    # ---- one growth step --------------------------------------------------------------------------------------
    def _loss(self, pl_module: pl.LightningModule) -> LossFn:
        loss = self.loss_fn or getattr(pl_module, "loss_fn", None) or getattr(pl_module, "criterion", None)
        if loss is None or not callable(loss):
            raise GrowthError(
                "FireflyCallback needs the loss: pass loss_fn=(outputs, targets) -> loss, or give the module a "
                "loss_fn / criterion attribute"
            )
        return loss

    def _growth_data(self, trainer: pl.Trainer) -> _GrowthBatches:
        loader = self.data if self.data is not None else trainer.train_dataloader
        if loader is None or isinstance(loader, (dict, list, tuple)):
            raise GrowthError(
                "FireflyCallback: the trainer has no single train dataloader to grow on; pass data=<loader>"
            )
        return _GrowthBatches(loader, self.batch)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> Any:
        """Run the grower under an RNG seeded by the grower's seed and the growth count (restored after)."""
        target = _submodule(pl_module, self.module)
        n = len(growth_history(target))
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(getattr(self.grower, "seed", 0)) * 1_000_003 + n)
            return self.grower.grow(
                target, self._growth_data(trainer), self._loss(pl_module), optimizer=optimizer,
                example_inputs=self.example_inputs,
            )

    def grow(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Grow now (every rank must call it under DDP); returns the report as a dict."""
        target = _submodule(pl_module, self.module)
        optimizers = list(trainer.optimizers)
        joint = _JointOptimizer(optimizers) if len(optimizers) > 1 else None
        optimizer = joint if joint is not None else (optimizers[0] if optimizers else None)
        was = pl_module.training
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        n_before = len(growth_history(target))
        report: Any = None
        if not distributed:
            report = self._decide(trainer, pl_module, optimizer)
        else:
            report = self._grow_ranks(trainer, pl_module, target, optimizer, n_before)
        if joint is not None:
            joint.scatter()
        pl_module.train(was)
        if distributed:
            self._check_ranks(pl_module, optimizers, n_before)
            self._broadcast_state(pl_module, optimizers)
            self._rewrap(trainer)
        self.reports.append(report)
        return report.to_dict() if hasattr(report, "to_dict") else dict(report)

    # ---- DDP ----------------------------------------------------------------------------------------------------
    def _grow_ranks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, optimizer: Any, n_before: int
    ) -> Any:
        """Rank 0 decides and applies; every other rank applies rank 0's plans (pure data) through the engine."""
        message: list[Any] = [None]
        report: Any = None
        if trainer.global_rank == 0:
            try:
                report = self._decide(trainer, pl_module, optimizer)
                message[0] = {
                    "history": growth_history(target)[n_before:],
                    "report": report.to_dict() if hasattr(report, "to_dict") else dict(report),
                    "layouts": optimizer_layouts(pl_module, trainer.optimizers),
                }
            except BaseException as e:
                dist.broadcast_object_list([{"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}], src=0)
                raise
            dist.broadcast_object_list(message, src=0)
            return report
        dist.broadcast_object_list(message, src=0)
        msg = message[0]
        if "error" in msg:
            raise GrowthError(f"rank 0 could not grow, so rank {trainer.global_rank} stops too ({msg['error']})")
        for record in msg["history"]:
            apply(target, Plan.from_dict(record), optimizer, verify=False)
        _set_optimizer_layouts(pl_module, trainer.optimizers, msg["layouts"])
        return msg["report"]

    def _check_ranks(self, pl_module: nn.Module, optimizers: list[torch.optim.Optimizer], n_before: int) -> None:
        mine = "/".join([architecture_hash(pl_module)] + [architecture_hash(pl_module, o) for o in optimizers])
        hashes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, mine)
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if bad:
            raise ArchitectureMismatchError(
                f"growth after plan {n_before}: the architecture differs across ranks "
                f"(rank 0 {hashes[0]}, rank {bad[0]} {hashes[bad[0]]})"
            )

    def _broadcast_state(self, pl_module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """Every rank continues from rank 0's weights, buffers and optimizer state."""
        with torch.no_grad():
            for t in pl_module.state_dict().values():
                dist.broadcast(t, src=0)
            for o in optimizers:
                for g in o.param_groups:
                    for p in g["params"]:
                        st = o.state.get(p, {})
                        for k in sorted(st):
                            if isinstance(st[k], torch.Tensor):
                                dist.broadcast(st[k], src=0)

    def _rewrap(self, trainer: pl.Trainer) -> None:
        """Rebuild Lightning's DDP wrapper over the grown parameters (the old one's reducer holds the old ones)."""
        strategy = trainer.strategy
        if not isinstance(strategy.model, DistributedDataParallel):
            return
        strategy.model = None  # drop the old wrapper: its reducer releases its hooks on the kept parameters
        gc.collect()
        strategy.model = strategy._setup_model(strategy.lightning_module)  # type: ignore[attr-defined]
        register = getattr(strategy, "_register_ddp_hooks", None)
        if register is not None:
            register()
