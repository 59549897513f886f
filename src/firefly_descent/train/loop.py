"""The training loop: epochs, growth schedule, metrics, checkpoints and exact resume.

One run directory holds::

    config.yaml      the resolved config
    metrics.jsonl    one JSON row per epoch
    growth.jsonl     one GrowthReport dict (plus epoch, params, FLOPs...) per growth; `after_epochs`
                     adds the held-out loss/accuracy 1 and 3 epochs after it (anytime metrics)
    train.log        the per-epoch log lines
    summary.json     final metrics (written when the run completes)
    checkpoints/     ckpt-<seq>-e<epoch>[g].pt, the newest `checkpoint.keep_last` kept

Sequence of a run: for each epoch, [grow if the previous epoch was a growth epoch → checkpoint]
→ train → evaluate → log → checkpoint. Growth "after epoch E" therefore happens at the start of
iteration E + 1, so a checkpoint taken after epoch E can be resumed either before or after the
growth. Every checkpoint stores all RNG states (torch, CUDA, numpy, python, DataLoader
generator), so a resumed run continues bit-for-bit like an uninterrupted one on the same
machine: a run killed mid-epoch restarts that epoch from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..engine.apply import growth_history
from ..engine.calibrate import calibrate_new_batchnorm, new_norm_channels
from ..io import atomic_write_text
from ..paths import check_output_dir
from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_save,
    capture_rng,
    checkpoint_path,
    jsonable,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
)
from .config import Config, ConfigError, config_from_dict, config_to_dict, growth_epochs, load_config
from .precision import autocast as _precision_autocast
from .progress import ProgressLines, done_line
from .runtime import Runtime, runtime_for
from .schedule import LRSchedule, make_optimizer
from .threads import busy_notice, choose_threads

__all__ = [
    "DeviceLoader",
    "RunSetup",
    "build_model_for",
    "evaluate",
    "prepare",
    "refresh_batchnorm",
    "resolve_device",
    "resume",
    "seed_everything",
    "train",
]

# epochs after a growth at which its record gets the held-out numbers (`after_epochs`)
ANYTIME_EPOCHS = (1, 3)

# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else MPS if available, else CPU; explicit names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("train.device: 'mps' requested but MPS is not available; use auto or cpu")
    return torch.device(name)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


class DeviceLoader:
    """Wrap a DataLoader: move batches to `device` and optionally stop after `max_batches`.

    Passed to growers so they see batches on the model's device; other attributes
    (``dataset``, ``batch_size``...) are forwarded to the wrapped loader.
    """

    def __init__(self, loader: Any, device: torch.device, max_batches: int | None = None) -> None:
        self.loader = loader
        self.device = device
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            yield _to_device(batch, self.device)

    def __len__(self) -> int:
        n = len(self.loader)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "device", "max_batches"):
            raise AttributeError(name)
        return getattr(self.loader, name)


def _fit_target(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.shape != y.shape and out.numel() == y.numel():
        return y.reshape(out.shape)
    return y


class _RegressionLoss(nn.Module):
    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(out, _fit_target(out, y).to(out.dtype))


def _make_loss(task: str, label_smoothing: float) -> nn.Module:
    if task == "regression":
        return _RegressionLoss()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def _autocast(device: torch.device, enabled: bool | str | None) -> contextlib.AbstractContextManager[Any]:
    # `enabled`: a precision mode ("bf16"/"fp16", train/precision.py) or the older bool (fp16 on CUDA)
    return _precision_autocast(device, enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    task: str = "classification",
    amp: bool = False,
) -> dict[str, float | None]:
    """Mean loss and accuracy (None for regression) of `model` over `loader`, in eval mode."""
    was_training = model.training
    model.eval()
    loss_fn = _make_loss(task, 0.0)
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in loader:
            x, y = _to_device(x, device), _to_device(y, device)
            with _autocast(device, amp):
                out = model(x)
            out = out.float()
            n = int(y.shape[0])
            loss_sum += float(loss_fn(out, y)) * n
            if task == "classification":
                correct += int((out.argmax(dim=1) == y).sum())
            total += n
    finally:
        model.train(was_training)
    if total == 0:
        return {"loss": None, "acc": None}
    return {"loss": loss_sum / total, "acc": (correct / total) if task == "classification" else None}


@torch.no_grad()
def _safety_of(report: Any) -> dict[str, Any] | None:
    """A grower report's safeguard record as a dict (reports are objects on rank 0, dicts elsewhere)."""
    s = report.get("safety") if isinstance(report, dict) else getattr(report, "safety", None)
    return s if s is None or isinstance(s, dict) else asdict(s)


def refresh_batchnorm(model: nn.Module, loader: Any, device: torch.device, max_batches: int | None = None) -> int:
    """Recompute BatchNorm running statistics as a cumulative average over `loader` batches.

    Runs the model in train mode under `no_grad` with ``momentum=None``, then restores every
    BatchNorm's momentum and the model's mode. Returns the number of BatchNorm layers refreshed.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    if not bns:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = _to_device(batch[0], device)
            model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


def _count_params(model: nn.Module) -> int:
    try:
        from firefly_descent.budget import count_params
    except ImportError:
        return int(sum(p.numel() for p in model.parameters()))
    return int(count_params(model))


def _count_flops(model: nn.Module, example: torch.Tensor) -> int | None:
    """FLOPs of one forward pass on a single example (None if unavailable)."""
    try:
        from firefly_descent.budget import count_flops
    except ImportError:
        return None
    was_training = model.training
    model.eval()
    try:
        return int(count_flops(model, (example[:1],)))
    except Exception:  # FLOPs are informative only; never fail a run over them
        return None
    finally:
        model.train(was_training)


def _growth_history(model: nn.Module) -> list[dict[str, Any]]:
    try:
        from firefly_descent.engine import growth_history
    except ImportError:
        return []
    return jsonable(growth_history(model))


def _replay_history(model: nn.Module, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    from firefly_descent.engine import replay_history

    replay_history(model, history)


def _growers() -> tuple[Any, Any]:
    try:
        from firefly_descent.methods import available_growers, make_grower
    except ImportError:
        from firefly_descent.methods.base import available_growers, make_grower
    return make_grower, available_growers


def _accepts_seed(method: str) -> bool:
    from firefly_descent.methods.base import _REGISTRY

    factory = _REGISTRY.get(method)
    if factory is None:
        return False
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params


# --------------------------------------------------------------------------- setup


def build_model_for(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Build the configured model, filling shape options (``in_features``, ``in_channels``,
    ``input_size``, ``num_classes``) from the dataset unless given. Returns (model, kwargs)."""
    from firefly_descent.models import available_models, build_model, model_spec

    name = cfg.model.name
    try:
        spec = model_spec(name)
    except ValueError:
        raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(available_models())}") from None
    kw = dict(cfg.model.kwargs)
    if "num_classes" in spec and "num_classes" not in kw:
        kw["num_classes"] = int(num_classes)
    if "in_features" in spec and "in_features" not in kw and spec["in_features"] is not None:
        kw["in_features"] = int(math.prod(input_shape))
    if len(input_shape) >= 2 and "in_channels" in spec and "in_channels" not in kw:
        kw["in_channels"] = int(input_shape[0])
    if len(input_shape) == 3 and "input_size" in spec and "input_size" not in kw:
        kw["input_size"] = int(input_shape[-1])
    try:
        model = build_model(name, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs: {' '.join(str(e).split())}") from None
    return model, kw


@dataclass
class RunSetup:
    """Everything built from a config before anything is written to disk."""

    cfg: Config
    device: torch.device
    bundle: Any
    train_loader: Any
    val_loader: Any
    test_loader: Any
    model: nn.Module
    model_kwargs: dict[str, Any]
    grower: Any
    task: str
    num_outputs: int
    example_inputs: torch.Tensor
    planned: list[int] = field(default_factory=list)


def prepare(cfg: Config) -> RunSetup:
    """Seed, load data, build model and grower, check the budget; raise `ConfigError` on bad input."""
    from firefly_descent.data import DatasetError, load_dataset, make_loaders

    t = cfg.train
    device = resolve_device(t.device)
    threads = choose_threads(t.threads)
    if t.deterministic and device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    seed_everything(t.seed)

    d = cfg.data
    try:
        bundle = load_dataset(
            d.name,
            d.root,
            val_fraction=d.val_fraction,
            seed=t.seed,
            train_subset=d.train_subset,
            test_subset=d.test_subset,
            augment=d.augment,
            **d.kwargs,
        )
        train_loader, val_loader, test_loader = make_loaders(
            bundle, d.batch_size, seed=t.seed, num_workers=d.num_workers, eval_batch_size=d.eval_batch_size
        )
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    except KeyError as e:
        raise ConfigError(f"data.name: unknown dataset {e}") from None

    task = "classification" if bundle.num_classes > 0 else "regression"
    if task == "classification":
        num_outputs = int(bundle.num_classes)
    else:
        tshape = tuple(bundle.train.targets.shape[1:])
        num_outputs = int(math.prod(tshape)) if tshape else 1
    model, model_kwargs = build_model_for(cfg, tuple(bundle.input_shape), num_outputs)
    model.to(device)

    g = cfg.growth
    make_grower, available_growers = _growers()
    if g.method not in available_growers():
        raise ConfigError(f"growth.method: unknown method {g.method!r}; allowed: {', '.join(available_growers())}")
    kwargs = dict(g.kwargs)
    if "seed" not in kwargs and _accepts_seed(g.method):
        kwargs["seed"] = t.seed  # growth randomness follows the run's seed unless set explicitly
    try:
        grower = make_grower(g.method, **kwargs)
        if callable(getattr(grower, "set_safeguard", None)):  # the grower makes BatchNorm ready to train itself
            grower.set_safeguard(calibrate_new_bn=g.calibrate_new_bn, refresh_bn=g.refresh_bn)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"growth.kwargs: {' '.join(str(e).split())}") from None
    if getattr(grower, "needs_validation", False) and val_loader is None:
        raise ConfigError(
            f"data.val_fraction: growth method {g.method!r} selects on validation data; set data.val_fraction > 0"
        )

    example_inputs = bundle.example_inputs(8).clone().to(device)
    params = _count_params(model)
    if g.max_params is not None and g.max_params <= params:
        raise ConfigError(f"growth.max_params: {g.max_params:,} is not above the initial model's {params:,} parameters")
    if g.max_flops is not None:
        flops = _count_flops(model, example_inputs)
        if flops is None:
            raise ConfigError("growth.max_flops: FLOP counting is unavailable for this model; use growth.max_params")
        if g.max_flops <= flops:
            raise ConfigError(f"growth.max_flops: {g.max_flops:,} is not above the initial model's {flops:,} FLOPs")
    notice = busy_notice(threads, t.threads) if device.type == "cpu" else None
    if notice:
        print(notice, file=sys.stderr, flush=True)
    return RunSetup(
        cfg=cfg,
        device=device,
        bundle=bundle,
        train_loader=train_loader,
        val_loader=val_loader,
        test_loader=test_loader,
        model=model,
        model_kwargs=model_kwargs,
        grower=grower,
        task=task,
        num_outputs=num_outputs,
        example_inputs=example_inputs,
        planned=growth_epochs(cfg),
    )


def _loader_generator(loader: Any) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    if gen is None:
        gen = getattr(getattr(loader, "sampler", None), "generator", None)
    return gen


# --------------------------------------------------------------------------- run state


class _Run:
    """Mutable state of one run plus the operations on it (kept private; use `train`/`resume`)."""

    def __init__(
        self, setup: RunSetup, run_dir: Path, progress: bool, callbacks: Sequence[Any] = (), rt: Runtime | None = None
    ) -> None:
        self.rt = rt if rt is not None else Runtime()  # one process, or one rank (train/runtime.py)
        self.rt.configure(setup)
        self.s = setup
        self.callbacks = list(callbacks)
        self.cfg = setup.cfg
        self.run_dir = run_dir
        self.model = setup.model
        self.device = setup.device
        self.optimizer = make_optimizer(self.model.parameters(), self.cfg.optim)
        self.amp = self.rt.mode  # autocast mode: None (fp32), "bf16" or "fp16"
        self.scaler = self.rt.scaler()
        self.loss_fn = _make_loss(setup.task, self.cfg.optim.label_smoothing)
        self.loader_gen = _loader_generator(setup.train_loader)
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
        self.writer: Any = None
        self._params = _count_params(self.model)
        self._flops = _count_flops(self.model, setup.example_inputs)
        self.schedule = LRSchedule.from_config(self.cfg, self._phase_end(0))

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if callable(fn):
                fn(payload, self.model)

    # ---- growth bookkeeping

    def _may_grow_more(self) -> bool:
        g = self.cfg.growth
        if g.max_params is not None and self._params >= g.max_params:
            return False
        if g.max_flops is not None and self._flops is not None and self._flops >= g.max_flops:
            return False
        return True

    def _next_planned(self, after: int) -> int | None:
        remaining = self.s.planned[self.num_growths :]
        for e in remaining:
            if e > after:
                return e
        return None

    def _phase_end(self, start: int) -> int:
        """End of the LR phase starting at epoch `start` (0-based training epoch index)."""
        if not self.cfg.schedule.restart_after_growth:
            return self.cfg.train.epochs
        nxt = self._next_planned(start)
        if nxt is None or not self._may_grow_more():
            return self.cfg.train.epochs
        return nxt

    # ---- files

    def _append_jsonl(self, name: str, row: Mapping[str, Any]) -> None:
        if not self.rt.is_main:
            return
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()

    def _rewrite_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not self.rt.is_main:
            return
        atomic_write_text(self.run_dir / name, "".join(json.dumps(row, default=float) + "\n" for row in rows))

    def log(self, line: str) -> None:
        if not self.rt.is_main:
            return
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _open_tensorboard(self) -> None:
        if not self.cfg.train.tensorboard or not self.rt.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: silently skip
            return
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    # ---- checkpoints

    def _param_names(self) -> list[list[str]]:
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

    def _sync_optimizer(self) -> None:
        """After growth: add model parameters the grower did not register with the optimizer."""
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.model.parameters() if id(p) not in known]
        if missing:
            self.optimizer.add_param_group({"params": missing})
        self._param_names()  # raises if stale parameters remain

    def save_checkpoint(self, after_growth: bool = False) -> Path:
        """Write an atomic checkpoint of the whole run state and prune old ones."""
        self.seq += 1
        if not self.rt.is_main:
            return checkpoint_path(self.run_dir, self.seq, self.epochs_done, after_growth)
        ckpt = {
            "format": FORMAT,
            "version": VERSION,
            "config": jsonable(config_to_dict(self.cfg)),
            "model": {"name": self.cfg.model.name, "kwargs": jsonable(self.s.model_kwargs)},
            "model_state": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "growth_history": _growth_history(self.model),
            "optimizer": self.optimizer.state_dict(),
            "optim_param_names": self._param_names(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "grower_state": self._grower_state(),
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
        path = checkpoint_path(self.run_dir, self.seq, self.epochs_done, after_growth)
        atomic_save(ckpt, path)
        prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def _grower_state(self) -> Any:
        fn = getattr(self.s.grower, "state_dict", None)
        return fn() if callable(fn) else None

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Restore everything from a checkpoint onto the freshly prepared setup."""
        _replay_history(self.model, ckpt.get("growth_history") or [])
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
        self._params = _count_params(self.model)
        self._flops = _count_flops(self.model, self.s.example_inputs)
        self._rewrite_jsonl("metrics.jsonl", self.metrics)
        self._rewrite_jsonl("growth.jsonl", self.growths)
        restore_rng(ckpt["rng"], self.loader_gen)

    # ---- phases of an epoch

    def grow(self) -> None:
        """Grow after epoch `epochs_done`, refresh BatchNorm, log and checkpoint."""
        cfg, s = self.cfg, self.s
        E = self.epochs_done
        grower = s.grower
        data = DeviceLoader(s.train_loader, self.device, cfg.growth.data_batches)
        if getattr(grower, "needs_validation", False):
            grower.val_data = DeviceLoader(s.val_loader, self.device)
        grower.epoch_batches = len(s.train_loader)  # for growers that size their work in epochs
        t0 = time.perf_counter()
        self.model.train()
        n_plans = len(growth_history(self.model))
        report = self.rt.grow(grower, self.model, data, self.loss_fn, self.optimizer, s.example_inputs)
        self.model.train()
        self._sync_optimizer()
        grow_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        n_cal = 0
        # growers built on methods.safety calibrate and refresh BatchNorm themselves (report.safety is set)
        # (on every rank: other ranks get rank 0's report as a dict, and its state by broadcast)
        safety = _safety_of(report)
        handled = safety is not None
        if handled:
            n_cal = int(safety["batchnorm"].get("calibrated_channels", 0))
        if cfg.growth.calibrate_new_bn and not handled:
            channels = new_norm_channels(self.model, growth_history(self.model)[n_plans:])
            if channels:
                batches = DeviceLoader(s.train_loader, self.device, cfg.growth.refresh_bn_batches)
                n_cal = calibrate_new_batchnorm(self.model, channels, batches, reduce=self.rt.reduce_stats)
        n_bn = 0 if not handled else int(safety["batchnorm"].get("refreshed_layers", 0))
        if cfg.growth.refresh_bn and not handled:
            n_bn = refresh_batchnorm(self.model, s.train_loader, self.device, cfg.growth.refresh_bn_batches)
            self.rt.sync_buffers(self.model)
        bn_time = time.perf_counter() - t1
        params_before = self._params
        self._params = _count_params(self.model)
        # growers count the model's FLOPs once per step and carry the count in the report (per sample, on
        # the same example inputs): no second count here (a dict on ranks other than 0; None: count)
        flops_after = report.get("flops_after") if isinstance(report, dict) else getattr(report, "flops_after", None)
        self._flops = int(flops_after) if flops_after is not None else _count_flops(self.model, s.example_inputs)
        test = self.rt.evaluate(self.model, s.test_loader, self.device, s.task, self.amp)
        self.num_growths += 1
        rec = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        rec = jsonable(rec)
        if not rec.get("params_before"):
            rec["params_before"] = params_before
        if not rec.get("params_after"):
            rec["params_after"] = self._params
        rec.update(
            {
                "index": self.num_growths,
                "epoch": E,
                "step": self.step,
                "params": self._params,
                "flops": self._flops,
                "grow_time": grow_time,
                "bn_refresh_time": bn_time,
                "bn_layers_refreshed": n_bn,
                "bn_channels_calibrated": n_cal,
                "time": grow_time + bn_time,
                "test_loss_after": test["loss"],
                "test_acc_after": test["acc"],
            }
        )
        self.growths.append(rec)
        self._append_jsonl("growth.jsonl", rec)
        self._emit("on_growth", rec)
        self.elapsed += time.perf_counter() - t0
        if cfg.schedule.restart_after_growth:
            self.schedule.new_phase(E, self._phase_end(E))
        acc = f" test acc {test['acc']:.2%}" if test["acc"] is not None else ""
        outcome = (safety or {}).get("outcome")
        checked = f" [{outcome}]" if outcome not in (None, "empty") else ""
        self.log(
            f"growth {self.num_growths} after epoch {E} [{cfg.growth.method}]{checked}: params "
            f"{params_before:,} -> {self._params:,} in {grow_time + bn_time:.1f}s;{acc}"
        )
        if self.writer is not None:
            self.writer.add_scalar("growth/params", self._params, self.step)
            self.writer.add_scalar("growth/time", grow_time + bn_time, self.step)

    def train_epoch(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.s
        E = self.epochs_done
        model, opt = self.rt.forward_module(self.model), self.optimizer
        model.train()
        self.rt.set_epoch(E)
        nb = len(s.train_loader)
        total, loss_sum, correct = 0, 0.0, 0
        lr = self.schedule.lr_at(E, 0, nb)
        t0 = time.perf_counter()
        bar = tqdm(
            s.train_loader,
            total=nb,
            desc=f"epoch {E + 1}/{cfg.train.epochs}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        lines = ProgressLines(nb, f"epoch {E + 1}/{cfg.train.epochs}") if self.progress_lines else None
        for b, (x, y) in enumerate(bar):
            lr = self.schedule.apply(opt, E, b, nb)
            x, y = self.rt.inputs(_to_device(x, self.device)), _to_device(y, self.device)
            opt.zero_grad(set_to_none=True)
            with _autocast(self.device, self.amp):
                out = model(x)
                loss = self.loss_fn(out, y)
                aux = model.auxiliary_loss(y, self.loss_fn) if hasattr(model, "auxiliary_loss") else None
                loss = loss if aux is None else loss + aux  # e.g. a DARTS network's auxiliary head
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {float(loss)} at epoch {E + 1}, step {self.step}; "
                    "lower optim.lr or check the data"
                )
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(opt)
                self.scaler.update()
            else:
                loss.backward()
                opt.step()
            n = int(y.shape[0])
            total += n
            loss_sum += float(loss.detach()) * n
            if s.task == "classification":
                correct += int((out.detach().argmax(dim=1) == y).sum())
            self.step += 1
            if lines is not None:
                lines.update(b + 1, loss_sum / total)
            if self.step % cfg.train.log_every == 0:
                if self.progress:
                    bar.set_postfix(loss=f"{loss_sum / total:.4f}", lr=f"{lr:.3g}")
                if self.writer is not None:
                    self.writer.add_scalar("train/batch_loss", float(loss.detach()), self.step)
                    self.writer.add_scalar("train/lr", lr, self.step)
        bar.close()
        total, loss_sum, correct = self.rt.reduce_sums(total, loss_sum, correct)
        train_time = time.perf_counter() - t0
        return {
            "train_loss": loss_sum / max(total, 1),
            "train_acc": (correct / max(total, 1)) if s.task == "classification" else None,
            "lr": lr,
            "epoch_time": train_time,
        }

    # ---- main loop

    def run(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.s
        epochs = cfg.train.epochs
        ebar = tqdm(
            total=epochs,
            initial=self.epochs_done,
            desc=cfg.name,
            unit="epoch",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while True:
                E = self.epochs_done
                if not self.growth_done_for_epoch:
                    if self.num_growths < len(s.planned) and s.planned[self.num_growths] == E and self._may_grow_more():
                        self.growth_done_for_epoch = True
                        self.grow()
                        self.save_checkpoint(after_growth=True)
                    else:
                        self.growth_done_for_epoch = True
                if E >= epochs:
                    break
                t0 = time.perf_counter()
                row: dict[str, Any] = {"epoch": E + 1}
                row.update(self.train_epoch())
                t_eval = time.perf_counter()
                test = self.rt.evaluate(self.model, s.test_loader, self.device, s.task, self.amp)
                row["test_loss"], row["test_acc"] = test["loss"], test["acc"]
                if s.val_loader is not None:
                    val = self.rt.evaluate(self.model, s.val_loader, self.device, s.task, self.amp)
                    row["val_loss"], row["val_acc"] = val["loss"], val["acc"]
                row["eval_time"] = time.perf_counter() - t_eval
                row["params"] = self._params
                row["flops"] = self._flops
                row["growth_time"] = float(sum(r.get("time", 0.0) for r in self.growths if r["epoch"] == E))
                row["growths"] = self.num_growths
                row["step"] = self.step
                self.elapsed += time.perf_counter() - t0
                row["elapsed"] = self.elapsed
                self.metrics.append(row)
                self.epochs_done = E + 1
                self.growth_done_for_epoch = False
                self._append_jsonl("metrics.jsonl", row)
                if self._note_anytime(row):
                    self._rewrite_jsonl("growth.jsonl", self.growths)
                self._log_epoch(row)
                self.save_checkpoint()
                self._emit("on_epoch_end", row)
                ebar.update(1)
        finally:
            ebar.close()
            if self.writer is not None:
                self.writer.close()
        summary = summarize(self.metrics, self.growths)
        summary["run_dir"] = str(self.run_dir)
        if self.rt.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
        self.log(done_line(summary))
        self._emit("on_train_end", summary)
        return summary

    def _note_anytime(self, row: dict[str, Any]) -> bool:
        """Attach this epoch's held-out numbers to each growth it follows by 1 or 3 epochs (`after_epochs`):
        a method's value may be a head start rather than final accuracy. True when a record changed."""
        changed = False
        for rec in self.growths:
            k = int(row["epoch"]) - int(rec["epoch"])
            if k in ANYTIME_EPOCHS:
                keys = ("test_loss", "test_acc", "val_loss", "val_acc", "train_loss", "train_acc", "params")
                rec.setdefault("after_epochs", {})[str(k)] = {key: row.get(key) for key in keys}
                changed = True
        return changed

    def _log_epoch(self, row: dict[str, Any]) -> None:
        def fmt(loss: float | None, acc: float | None) -> str:
            if loss is None:
                return "n/a"
            return f"{loss:.4f}" + (f"/{acc:.2%}" if acc is not None else "")

        parts = [
            f"epoch {row['epoch']}/{self.cfg.train.epochs}",
            f"train {fmt(row['train_loss'], row['train_acc'])}",
            f"test {fmt(row['test_loss'], row['test_acc'])}",
        ]
        if "val_loss" in row:
            parts.append(f"val {fmt(row['val_loss'], row['val_acc'])}")
        parts.append(f"params {row['params']:,}")
        parts.append(f"lr {row['lr']:.3g}")
        t = row["epoch_time"]
        parts.append(f"{t:.2f}s" if t < 10 else f"{t:.0f}s")
        self.log(" | ".join(parts))
        if self.writer is not None:
            for k in (
                "train_loss",
                "train_acc",
                "test_loss",
                "test_acc",
                "val_loss",
                "val_acc",
                "params",
                "lr",
            ):
                if row.get(k) is not None:
                    self.writer.add_scalar(k.replace("_", "/", 1), row[k], row["epoch"])


def summarize(metrics: list[dict[str, Any]], growths: list[dict[str, Any]]) -> dict[str, Any]:
    """Final metrics of a run from its per-epoch rows and growth records."""
    if not metrics:
        return {"epochs": 0, "num_growths": len(growths)}
    last = metrics[-1]
    accs = [r["test_acc"] for r in metrics if r.get("test_acc") is not None]
    out = {
        "epochs": last["epoch"],
        "final_test_loss": last.get("test_loss"),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": max(accs) if accs else None,
        "final_train_loss": last.get("train_loss"),
        "final_train_acc": last.get("train_acc"),
        "params": last.get("params"),
        "flops": last.get("flops"),
        "num_growths": len(growths),
        "total_time": last.get("elapsed"),
        "growth_time": float(sum(r.get("time", 0.0) for r in growths)),
    }
    if "val_acc" in last:
        out["final_val_acc"] = last.get("val_acc")
    return out


# --------------------------------------------------------------------------- public entry points


def _default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.name}-{stamp}"


def train(
    config: Config | Mapping[str, Any] | str | Path,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overrides: tuple[str, ...] | list[str] = (),
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train (and grow) a model as configured; return the final metrics.

    `config` is a `Config`, a plain dict, a YAML path or a built-in config name; `overrides`
    are ``key.sub=value`` strings. Everything is validated (including loading the data and
    building model and grower) before `out_dir` is created. With ``resume=True`` and an
    `out_dir` holding checkpoints, continue that run instead (see `resume`).

    `callbacks` are objects with any of ``on_epoch_end(row, model)``, ``on_growth(record, model)``
    and ``on_train_end(summary, model)``; each receives the dict also written to disk.
    """
    if resume:
        if out_dir is None:
            raise CheckpointError("resume: a run directory is required")
        if list_checkpoints(out_dir):
            return _resume(Path(out_dir), progress, callbacks)
    cfg = load_config(config, overrides)
    rt = runtime_for(cfg.train.device)  # under torchrun: joins the process group
    run_dir = Path(rt.agree(str(out_dir) if out_dir is not None else str(_default_run_dir(cfg))))
    return _start(cfg, run_dir, progress, callbacks, rt=rt)


def _start(
    cfg: Config,
    run_dir: Path,
    progress: bool,
    callbacks: Sequence[Any] = (),
    restart: bool = False,
    rt: Runtime | None = None,
) -> dict[str, Any]:
    rt = rt if rt is not None else runtime_for(cfg.train.device)
    metrics = run_dir / "metrics.jsonl"
    if list_checkpoints(run_dir) or (not restart and metrics.is_file() and metrics.stat().st_size > 0):
        raise CheckpointError(f"{run_dir}: already holds a run; use `firefly resume {run_dir}` or another --out")
    check_output_dir(run_dir, "run directory")  # before the data loads
    rt.barrier()  # every rank checked the directory before rank 0 writes into it
    setup = prepare(cfg)
    rt.configure(setup)  # refuses bad precision/batch options before anything is written
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), encoding="utf-8"
        )
        for name in ("metrics.jsonl", "growth.jsonl", "train.log"):
            (run_dir / name).write_text("", encoding="utf-8")
    run = _Run(setup, run_dir, progress, callbacks, rt)
    run._open_tensorboard()
    run.log(
        f"run {cfg.name}: {cfg.model.name} on {setup.bundle.name} ({len(setup.bundle.train)} train), "
        f"{run._params:,} params, growth {cfg.growth.method} after epochs {setup.planned or '-'}, "
        f"device {setup.device}, out {run_dir}" + (f", {rt.world_size} processes" if rt.distributed else "")
    )
    try:
        return run.run()
    finally:
        rt.close()


def resume(run_dir: str | Path, progress: bool = True, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Continue a run from its newest complete checkpoint, exactly as if never interrupted."""
    return _resume(Path(run_dir), progress, callbacks)


def _resume(run_dir: Path, progress: bool, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        if (run_dir / "config.yaml").is_file():  # killed during the first epoch: start over
            try:
                raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
            except yaml.YAMLError:
                raw = None
            if isinstance(raw, dict):
                return _start(config_from_dict(raw), run_dir, progress, callbacks, restart=True)
        raise CheckpointError(f"{run_dir}: no checkpoints to resume from")
    ckpt = None
    for path in reversed(ckpts):
        try:
            ckpt = load_checkpoint(path)
            break
        except CheckpointError:
            continue
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no readable checkpoint")
    cfg = config_from_dict(ckpt["config"])
    finished = _finished_summary(run_dir, ckpt, cfg)
    if finished is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"{run_dir}: run complete ({ckpt['epoch']}/{cfg.train.epochs} epochs); nothing to resume")
        return finished
    rt = runtime_for(cfg.train.device)
    setup = prepare(cfg)
    run = _Run(setup, run_dir, progress, callbacks, rt)
    run.load_state(ckpt)
    run._open_tensorboard()
    if run.epochs_done < cfg.train.epochs or not run.growth_done_for_epoch:
        run.log(f"resuming {cfg.name} from {Path(ckpt['path']).name} (epoch {run.epochs_done}, step {run.step})")
    try:
        return run.run()
    finally:
        rt.close()


def _finished_summary(run_dir: Path, ckpt: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The saved summary of a run that already completed (last epoch trained, summary written), else None.
    (No growth can follow the last epoch: growth epochs are validated to lie before it.)"""
    if int(ckpt["epoch"]) < cfg.train.epochs:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # killed between the last checkpoint and the summary: finish it
    if not isinstance(summary, dict):
        return None
    return {**summary, "run_dir": str(run_dir), "already_complete": True}
