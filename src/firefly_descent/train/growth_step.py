"""One growth step of a run: the grower's decision, BatchNorm made ready, the record logged.

Growers built on `methods.safety` calibrate and refresh BatchNorm themselves (their report carries a
``safety`` record); for any other grower the step does it here with the engine's
`calibrate_new_batchnorm` and `refresh_batchnorm`, per ``growth.calibrate_new_bn`` / ``growth.refresh_bn``.
Under torch.distributed the runtime runs the grower and synchronises the ranks (train/distributed.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from ..budget import Budget
from ..engine import calibrate_new_batchnorm, growth_history, new_norm_channels, refresh_batchnorm
from .checkpoint import jsonable
from .device import DeviceLoader
from .state import Run

__all__ = ["grow", "safety_record"]


def safety_record(report: Any) -> dict[str, Any] | None:
    """A grower report's safeguard record as a dict (reports are objects on rank 0, dicts elsewhere)."""
    s = report.get("safety") if isinstance(report, dict) else getattr(report, "safety", None)
    return s if s is None or isinstance(s, dict) else asdict(s)


def _prepare_batchnorm(run: Run, n_plans: int, handled: bool) -> tuple[int, int]:
    """Calibrate new BatchNorm channels and refresh running statistics unless the grower did;
    returns (channels calibrated, layers refreshed) for growers that did not report their own."""
    cfg, s = run.cfg, run.s
    n_cal = n_bn = 0
    if cfg.growth.calibrate_new_bn is not False and not handled:
        channels = new_norm_channels(run.model, growth_history(run.model)[n_plans:])
        if channels:
            batches = DeviceLoader(s.train_loader, run.device, cfg.growth.refresh_bn_batches)
            n_cal = calibrate_new_batchnorm(run.model, channels, batches, reduce=run.rt.reduce_stats)
    if cfg.growth.refresh_bn and not handled:
        n_bn = refresh_batchnorm(run.model, DeviceLoader(s.train_loader, run.device, cfg.growth.refresh_bn_batches))
        run.rt.sync_buffers(run.model)
    return n_cal, n_bn


def grow(run: Run) -> None:
    """Grow after epoch `run.epochs_done`, make BatchNorm ready, record and log the step."""
    cfg, s = run.cfg, run.s
    E = run.epochs_done
    grower = s.grower
    data = DeviceLoader(s.train_loader, run.device, cfg.growth.data_batches)
    if getattr(grower, "needs_validation", False):
        grower.val_data = DeviceLoader(s.val_loader, run.device)
    grower.epoch_batches = len(s.train_loader)  # for growers that size their work in epochs
    if cfg.growth.budgets is not None and run.num_growths < len(cfg.growth.budgets):
        # this step's budget (setup checked the grower has one); per-group pools stay as the grower set them
        per_group = grower.budget.per_group
        grower.budget = Budget.parse(cfg.growth.budgets[run.num_growths])
        grower.budget.per_group = per_group
    t0 = time.perf_counter()
    run.model.train()
    n_plans = len(growth_history(run.model))
    report = run.rt.grow(grower, run.model, data, run.loss_fn, run.optimizer, s.example_inputs)
    run.model.train()
    run.sync_optimizer()
    grow_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    # (on every rank: other ranks get rank 0's report as a dict, and its state by broadcast)
    safety = safety_record(report)
    handled = safety is not None
    n_cal, n_bn = _prepare_batchnorm(run, n_plans, handled)
    if handled:
        n_cal = int(safety["batchnorm"].get("calibrated_channels", 0))
        n_bn = int(safety["batchnorm"].get("refreshed_layers", 0))
    bn_time = time.perf_counter() - t1
    params_before = run.params
    # growers count the model's FLOPs once per step (per sample) and carry the count in the report: no second
    # count here (other ranks get rank 0's report as a dict)
    run.measure(report.get("flops_after") if isinstance(report, dict) else getattr(report, "flops_after", None))
    test = run.rt.evaluate(run.model, s.test_loader, run.device, s.task, run.amp)
    run.num_growths += 1
    rec = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    rec = jsonable(rec)
    if not rec.get("params_before"):
        rec["params_before"] = params_before
    if not rec.get("params_after"):
        rec["params_after"] = run.params
    rec.update(
        {
            "index": run.num_growths,
            "epoch": E,
            "step": run.step,
            "params": run.params,
            "flops": run.flops,
            "grow_time": grow_time,
            "bn_refresh_time": bn_time,
            "bn_layers_refreshed": n_bn,
            "bn_channels_calibrated": n_cal,
            "time": grow_time + bn_time,
            "test_loss_after": test["loss"],
            "test_acc_after": test["acc"],
        }
    )
    run.growths.append(rec)
    run.files.append_jsonl("growth.jsonl", rec)
    run.emit("on_growth", rec)
    run.elapsed += time.perf_counter() - t0
    nb = len(s.train_loader)
    lr_before = run.schedule.lr_at(E - 1, nb - 1, nb) if E > 0 else None
    if cfg.schedule.restart_after_growth:
        run.schedule.new_phase(E, run.phase_end(E))
    if cfg.schedule.warmup_after_growth > 0 and lr_before is not None:
        run.schedule.warm_up(E, lr_before)
    acc = f" test acc {test['acc']:.2%}" if test["acc"] is not None else ""
    outcome = (safety or {}).get("outcome")
    checked = f" [{outcome}]" if outcome not in (None, "empty") else ""
    run.log(
        f"growth {run.num_growths} after epoch {E} [{cfg.growth.method}]{checked}: params "
        f"{params_before:,} -> {run.params:,} in {grow_time + bn_time:.1f}s;{acc}"
    )
    run.files.scalar("growth/params", run.params, run.step)
    run.files.scalar("growth/time", grow_time + bn_time, run.step)
