"""``firefly train|resume --nproc N``: check everything here, then start N ranks with torchrun's launcher.

Validation happens in this process (one-line errors, nothing spawned): the config, the global batch
against N, the run directory; ``resume`` of a finished run says so without starting torchrun. The
workers get ``OMP_NUM_THREADS=1`` unless it is set (torchrun's own default, without its banner).
Ctrl-C stops every rank and raises `KeyboardInterrupt` here, so ``firefly`` prints ``interrupted``
and exits 130, as a single process does.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from .config import ConfigError, config_from_dict, load_config
from .loop import finished_summary, latest_readable_checkpoint
from .rundir import check_new_run_dir, default_run_dir, require_run_dir

__all__ = ["LAUNCHED_ENV", "LaunchError", "launch", "launch_resume", "launch_train"]


class LaunchError(RuntimeError):
    """A worker process of `launch` failed (its own error line was printed above)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# set for the workers of `launch`: an interrupted worker leaves the one ``interrupted`` line to the launcher
LAUNCHED_ENV = "FIREFLY_LAUNCHED"


@contextmanager
def _quiet_agent() -> Iterator[None]:
    """Keep torchrun's agent from logging a signal's shutdown as warnings and tracebacks."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def launch(cli_args: Sequence[str], nproc: int, torchrun_args: Sequence[str] = ()) -> int:
    """Run ``firefly <cli_args>`` in `nproc` local processes through torch.distributed.run (torchrun's
    elastic launcher, standalone rendezvous on a free port). Returns 0, or raises `LaunchError`
    (a worker failed) or `KeyboardInterrupt` (Ctrl-C or SIGTERM; the workers are stopped)."""
    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    argv = ["--standalone", f"--nproc_per_node={nproc}", *torchrun_args, "--module", "firefly_descent.cli"]
    args = get_args_parser().parse_args([*argv, *cli_args])
    added = [k for k, v in (("OMP_NUM_THREADS", "1"), (LAUNCHED_ENV, "1")) if k not in os.environ]
    os.environ.update(dict.fromkeys(added, "1"))  # for the workers only (removed below); OMP_NUM_THREADS=1 is
    t0 = time.time()  # what torchrun sets anyway, minus its banner
    try:
        with _quiet_agent():
            run(args)
    except SignalException:
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        rank, first = failures[0]
        code = int(first.exitcode) if first.exitcode is not None else 1
        sys.stderr.flush()
        if code in (130, -2):  # the workers were interrupted (Ctrl-C reaches the whole process group)
            raise KeyboardInterrupt from None
        raise LaunchError(
            f"{len(failures)} of {nproc} processes failed after {time.time() - t0:.0f}s (first: rank {rank}, "
            f"exit code {code}); see its error line above",
            exit_code=2 if code == 2 else 1,
        ) from None
    finally:
        for k in added:
            os.environ.pop(k, None)
    return 0


def launch_train(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    overrides: Sequence[str],
    nproc: int,
    no_progress: bool = False,
) -> int:
    """``firefly train CONFIG --nproc N``: validate here (one-line errors, nothing spawned), fix the run
    directory once for all ranks, then `launch` N ranks of ``firefly train``."""
    cfg = load_config(config, overrides)
    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    if cfg.data.batch_size % nproc:
        raise ConfigError(
            f"data.batch_size: the global batch {cfg.data.batch_size} is not divisible by --nproc {nproc}; "
            f"use a multiple of {nproc}"
        )
    run_dir = str(out) if out is not None else str(default_run_dir(cfg))
    check_new_run_dir(run_dir)
    args = ["train", str(config), "--out", run_dir]
    for o in overrides:
        args += ["--set", o]
    if no_progress:
        args.append("--no-progress")
    return launch(args, nproc)


def launch_resume(run_dir: str | os.PathLike[str], nproc: int, no_progress: bool = False) -> int:
    """``firefly resume RUN_DIR --nproc N`` (N may differ from the run's original process count); a finished
    run is reported as complete here, without starting any process."""
    path = Path(run_dir)
    require_run_dir(path)
    ckpt = latest_readable_checkpoint(path)
    if ckpt is not None:
        cfg = config_from_dict(ckpt["config"])
        if finished_summary(path, ckpt, cfg) is not None:
            print(f"{run_dir}: run complete ({ckpt['epoch']}/{cfg.train.epochs} epochs); nothing to resume")
            return 0
    return launch(["resume", str(run_dir)] + (["--no-progress"] if no_progress else []), nproc)
