"""The one driver of the benchmark suites (issue 6): the paper's width-growth comparison at CPU scale, with
seeds, and the cost of growing.

The suites are data in benchmarks/suite_defs/ (one module per suite: base config per preset, methods, seeds);
result files are read and written by benchmarks/results_io.py. Every training run goes through the library's
own `firefly_descent.train.train` with a config dict; each (suite, method, seed) writes one JSON result file,
atomically, and finished runs are skipped when re-run::

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
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from firefly_descent.methods import make_grower
from firefly_descent.methods.baselines.random_growth import placement_of
from firefly_descent.models import build_model
from firefly_descent.train import config_to_dict, list_checkpoints, load_checkpoint, load_config, train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # imported from elsewhere (tests, make_docs.py): the sibling modules below
    sys.path.insert(0, str(HERE))

import growth_cost  # noqa: E402  (benchmarks/growth_cost.py: suite C's measurement)
from results_io import (  # noqa: E402
    FORMAT,
    atomic_write_json,
    default_results,
    environment,
    jsonable,
    read_json,
    read_jsonl,
    rel,
    result_path,
    rounds_of,
)
from suite_defs import CIFAR10_ENV, CIFAR100_ENV, PRESETS, SUITES, Method, SkipRun, Suite  # noqa: E402
from suite_defs.c import COST_PRESETS  # noqa: E402

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


# --------------------------------------------------------------------------- configs


def build_config(
    suite: str,
    method: str,
    seed: int,
    preset: str,
    overrides: Sequence[str] = (),
    results: Path | None = None,
    threads: int | None = THREADS,
) -> dict[str, Any]:
    """The full resolved training config (a plain dict) of one run; raises `SkipRun` when it cannot run yet
    (a replay or matched control whose source run has no result in `results` yet)."""
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
    if m.kind in ("matched", "replay"):
        src = result_path(results or HERE / "results", suite, str(m.replay_of), seed)
        prior = read_json(src)
        usable = bool(prior) and prior.get("preset") == preset
        usable = usable and bool(prior.get("growths") if m.kind == "matched" else prior.get("final_architecture"))
        if not usable:
            raise SkipRun(
                f"{method} (seed {seed}) needs the finished {m.replay_of} run of the same seed and preset "
                f"({src} is missing or from another preset); run `--methods {m.replay_of}` first"
            )
        if m.kind == "matched":
            raw["growth"]["kwargs"]["placement"] = placement_of(prior["growths"])
        else:
            arch = prior["final_architecture"]
            raw["model"] = {
                "name": "replayed-architecture",
                "kwargs": {"base": arch["name"], "base_kwargs": arch["kwargs"], "history": arch["growth_history"]},
            }
    if m.budget_of is not None:
        spent = _round_params(suite, method, m.budget_of, seed, preset, results)
        raw["growth"]["budgets"] = [f"params:{n}" for n in spent]
    cfg = load_config(raw, list(overrides))
    return jsonable(config_to_dict(cfg))


def _round_params(suite: str, method: str, source: str, seed: int, preset: str, results: Path | None) -> list[int]:
    """Parameters the finished `source` run (same suite, seed and preset) added in each growth round (at least
    1: a round the safeguard undid gives the peer a budget nothing fits)."""
    src = result_path(results or HERE / "results", suite, source, seed)
    prior = read_json(src)
    if not (prior and prior.get("preset") == preset and prior.get("growths")):
        raise SkipRun(
            f"{method} (seed {seed}) is budget-matched to the finished {source} run of the same seed and preset "
            f"({src} is missing or from another preset); run `--methods {source}` first"
        )
    return [max(1, int(g["params_after"]) - int(g["params_before"])) for g in prior["growths"]]


# --------------------------------------------------------------------------- training suites


def _run_command(
    suite: str, method: str, seed: int, preset: str, results: Path, overrides: Sequence[str], threads: int | None
) -> str:
    """The command that re-runs exactly this (suite, method, seed), recorded in its result file."""
    parts = ["python", "benchmarks/suites.py", "--suite", suite, "--preset", preset]
    parts += ["--methods", method, "--seeds", str(seed), "--results", rel(results)]
    if threads != THREADS:
        parts += ["--threads", str(threads or 0)]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def _final_architecture(run_dir: Path) -> dict[str, Any] | None:
    """Model name, resolved kwargs and structural growth history from a run's newest checkpoint."""
    try:
        ckpt = load_checkpoint(run_dir)
    except Exception:
        return None
    return jsonable(
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
    cfg = build_config(suite, method, seed, preset, overrides, results, threads)
    run_dir = runs / preset / suite / f"{method}-s{seed}"
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            same = jsonable(yaml.safe_load(saved.read_text(encoding="utf-8"))) == cfg
        except yaml.YAMLError:
            same = False
        if not same:  # a scratch folder from another config: start over
            shutil.rmtree(run_dir)
    resumed = bool(list_checkpoints(run_dir))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    summary = train(cfg, run_dir, resume=True, progress=progress)
    wall = time.perf_counter() - t0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    growths = read_jsonl(run_dir / "growth.jsonl")
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
        "summary": jsonable(summary),
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
        "run_dir": rel(run_dir),
    }


# --------------------------------------------------------------------------- suite C (growth cost)


def _cost_method(method: str, seed: int) -> tuple[str, dict[str, Any]]:
    """Suite C's (grower, kwargs) of `method`, seeded like a training suite's grower."""
    m = SUITES["C"].methods[method]
    kw = dict(m.kwargs)
    if m.grower != "static":
        kw.setdefault("seed", int(seed))
    return m.grower, kw


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
    cost_preset = COST_PRESETS[preset]
    cfg = dict(growth_cost.PRESETS[cost_preset])
    grower_name, kw = _cost_method(method, seed)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.perf_counter()
    row: dict[str, Any] = growth_cost.measure_growth(cfg, grower_name, kw, seed)
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
        "cost": jsonable(row),
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
    """The fresh process of `_probe`: prints the peak in bytes."""
    if threads:
        torch.set_num_threads(threads)
    methods = {} if what == "train" else {what: _cost_method(what, int(seed))}
    print(growth_cost.memory_probe(growth_cost.PRESETS[cost_preset], what, methods))


# --------------------------------------------------------------------------- driver

_WARM: set[str] = set()


def warm_up(growers: Sequence[str]) -> float:
    """Grow a tiny MLP once with each grower not yet used in this process, so one-off first-call costs
    (imports, tracing, parametrisation set-up: seconds) are not charged to the first measured run."""
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


def _failure_record(suite: str, method: str, seed: int, preset: str, command: str, e: Exception) -> dict[str, Any]:
    """What a failed run's ``.failed.json`` holds (make_docs lists it; the next run of the suite retries it)."""
    return {
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
    }


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
                atomic_write_json(failed, _failure_record(suite, method, seed, preset, command, e))
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
