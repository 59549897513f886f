"""Starting and resuming runs: `train` and `resume`, the library's entry points to the training loop.

The parts, a file per job: `setup` builds data, model and grower from the config; `rundir` owns the
run directory and its logs; `state` holds a run's state and checkpoints; `growth_step` grows; `epochs`
is the epoch loop; `runtime` / `distributed` say how one process or one torchrun rank executes it.
Everything is validated (including loading the data and building model and grower) before the run
directory is written.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import export_hint, list_checkpoints, load_checkpoint
from .config import Config, config_from_dict, load_config
from .distributed import runtime_for
from .epochs import run_epochs
from .rundir import CheckpointError, RunDir, check_new_run_dir, check_resumable_dir, default_run_dir, require_run_dir
from .runtime import Runtime
from .schedule import milestone_notice, short_phase_notice
from .setup import prepare, refuse_calibration_without_effect
from .state import Run

__all__ = ["finished_summary", "latest_readable_checkpoint", "resume", "train"]


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
    run_dir = Path(rt.agree(str(out_dir) if out_dir is not None else str(default_run_dir(cfg))))
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
    check_new_run_dir(run_dir, restart=restart)  # before the data loads
    rt.barrier()  # every rank checked the directory before rank 0 writes into it
    setup = prepare(cfg)
    if not restart:  # a new run's config only: runs saved before this check (calibrate_new_bn: true) still resume
        refuse_calibration_without_effect(cfg, setup.grower)
    rt.configure(setup)  # refuses bad precision/batch options before anything is written
    for notice in (milestone_notice(setup.cfg), short_phase_notice(setup.cfg)):
        if notice and rt.is_main:
            print(notice, file=sys.stderr, flush=True)
    files = RunDir(run_dir, rt.is_main)
    files.create(setup.cfg)
    run = Run(setup, run_dir, progress, callbacks, rt)
    run.files.open_tensorboard(setup.cfg.train.tensorboard)
    run.log(
        f"run {cfg.name}: {cfg.model.name} on {setup.bundle.name} ({len(setup.bundle.train)} train), "
        f"{run.params:,} params, growth {cfg.growth.method} after epochs {setup.planned or '-'}, "
        f"device {setup.device}, out {run_dir}" + (f", {rt.world_size} processes" if rt.distributed else "")
    )
    try:
        return run_epochs(run)
    finally:
        rt.close()


def resume(run_dir: str | Path, progress: bool = True, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Continue a run from its newest complete checkpoint, exactly as if never interrupted."""
    return _resume(Path(run_dir), progress, callbacks)


def latest_readable_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint of `run_dir` that loads, or None when it has none (unreadable ones are skipped)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    for path in reversed(ckpts):
        try:
            return load_checkpoint(path)
        except CheckpointError:
            continue
    raise CheckpointError(f"{run_dir}: no readable checkpoint")


def _resume(run_dir: Path, progress: bool, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    require_run_dir(run_dir)
    ckpt = latest_readable_checkpoint(run_dir)
    if ckpt is None:
        hint = export_hint(run_dir)
        if hint is not None:  # an export also holds a config.yaml: never train into it
            raise CheckpointError(hint)
        if (run_dir / "config.yaml").is_file():  # killed during the first epoch: start over
            try:
                raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
            except yaml.YAMLError:
                raw = None
            if isinstance(raw, dict):
                check_resumable_dir(run_dir)
                return _start(config_from_dict(raw), run_dir, progress, callbacks, restart=True)
        raise CheckpointError(f"{run_dir}: no checkpoints to resume from")
    cfg = config_from_dict(ckpt["config"])
    finished = finished_summary(run_dir, ckpt, cfg)
    if finished is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"{run_dir}: run complete ({ckpt['epoch']}/{cfg.train.epochs} epochs); nothing to resume")
        return finished
    check_resumable_dir(run_dir)  # one line now, not a failed checkpoint write an epoch later
    rt = runtime_for(cfg.train.device)
    setup = prepare(cfg)
    run = Run(setup, run_dir, progress, callbacks, rt)
    run.load_state(ckpt)
    run.files.open_tensorboard(cfg.train.tensorboard)
    if run.epochs_done < cfg.train.epochs or not run.growth_done_for_epoch:
        run.log(f"resuming {cfg.name} from {Path(ckpt['path']).name} (epoch {run.epochs_done}, step {run.step})")
    try:
        return run_epochs(run)
    finally:
        rt.close()


def finished_summary(run_dir: Path, ckpt: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
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
