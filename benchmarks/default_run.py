"""Regenerate docs/default-run/ (the README's default run) in one command:

    python benchmarks/default_run.py                  # runs into runs/docs/, writes docs/default-run/

It runs the README's command (`firefly train fashion-vgg-firefly`) and its static control
(`firefly train fashion-vgg-static`), both with the default thread count, then `firefly report` into
docs/default-run/, copies the Firefly run's own `summary.json` there as `run-summary.json` and its
`growth.jsonl` and `metrics.jsonl` as `run-growth.jsonl` and `run-metrics.jsonl` without their wall-clock
fields (tests check the committed numbers, and the README's, against them and against a fresh run's format)
and writes docs/default-run/README.md from the numbers. A run directory that already holds a finished run
is reused (`firefly resume` says it is complete), and a killed one is resumed, so the command can be re-run
after an interruption.

Accuracy and parameter counts do not depend on timing; wall times do, so the README records the load
average seen during the runs and flags times measured on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("default", "fashion-vgg-firefly"), ("static", "fashion-vgg-static"))


def _firefly(*args: str) -> None:
    cmd = [sys.executable, "-m", "firefly_descent.cli", *args]
    print("+ firefly " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def run_all(runs_dir: Path, names: list[str], threads: int | None) -> tuple[list[float], list[str]]:
    """Train (or resume, or reuse) the runs; return the 1-minute load averages sampled every 5 s meanwhile
    (they include the runs' own threads: a quiet machine shows about the thread count) and the names of
    runs that were already complete (reused: their training happened under unknown load)."""
    reused: list[str] = []
    loads = [_load()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5.0):
            loads.append(_load())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for name, config in RUNS:
            if name not in names:
                continue
            out = runs_dir / name
            if (out / "checkpoints").is_dir():
                if (out / "summary.json").is_file():
                    reused.append(name)
                _firefly("resume", str(out), "--no-progress")
            else:
                extra = ["--set", f"train.threads={threads}"] if threads is not None else []
                _firefly("train", config, "--out", str(out), "--no-progress", *extra)
    finally:
        stop.set()
        sampler.join()
    return loads, reused


def without_times(record: object) -> object:
    """A run record without its wall-clock fields (`*time`, `timings`, `elapsed`): they depend on the machine's
    load, every other field on the code and the thread count only."""
    if isinstance(record, dict):
        drop = ("timings", "elapsed")
        return {k: without_times(v) for k, v in record.items() if not (k.endswith("time") or k in drop)}
    if isinstance(record, list):
        return [without_times(v) for v in record]
    return record


def growth_steps(growths: list[dict]) -> str:
    """"4,322 → 7,520 (+74 %), …": parameters before and after each growth, as the README quotes the first."""
    return ", ".join(
        f"{g['params_before']:,} → {g['params_after']:,} "
        f"(+{round(100 * (g['params_after'] / g['params_before'] - 1))} %)"
        for g in growths
    )


def batchnorm_sentence(growths: list[dict]) -> str:
    """What the growths did to BatchNorm, read from the growth records."""
    counts = ", ".join(str(g.get("bn_channels_calibrated")) for g in growths)
    if all(g.get("bn_channels_calibrated") == 0 for g in growths):
        text = (
            f"BatchNorm running statistics are refreshed after each growth; no new BatchNorm channel is calibrated "
            f"(`bn_channels_calibrated`: {counts}), since Firefly's default `bn_mode=\"batch\"` fits and scores its "
            "candidates with batch statistics, the mode training continues in."
        )
    else:
        text = f"New BatchNorm channels calibrated at each growth (`bn_channels_calibrated`): {counts}."
    return textwrap.fill(text, 108, break_on_hyphens=False)


def write_readme(
    docs: Path, runs_dir: Path, loads: list[float], reused: list[str], table: str, static: bool
) -> None:
    """docs/default-run/README.md from the numbers just written (nothing typed by hand)."""
    import torch
    import yaml

    from firefly_descent.train.threads import available_cores

    summary = json.loads((docs / "run-summary.json").read_text())
    growths = [json.loads(line) for line in (docs / "run-growth.jsonl").read_text().splitlines() if line.strip()]
    cores = available_cores()
    shown = str(runs_dir.resolve().relative_to(ROOT)) if runs_dir.resolve().is_relative_to(ROOT) else str(runs_dir)
    commands = []
    for name, config in RUNS:
        if not (runs_dir / name / "config.yaml").is_file():
            continue
        threads = (yaml.safe_load((runs_dir / name / "config.yaml").read_text())["train"] or {}).get("threads")
        extra = f" --set train.threads={threads}" if threads is not None else ""
        what = "the README's command" if name == "default" else "the same network and schedule, never grown"
        commands.append(f"firefly train {config} --out {shown}/{name}{extra}    # {what}")
    from firefly_descent.train.threads import choose_threads

    default_threads = choose_threads(None)
    median = statistics.median(loads)
    busy = median > cores + 0.5  # the runs' own threads account for about `cores`
    timing = (
        f"The {' and '.join(reused)} run(s) were made by an earlier invocation and reused, so this script did "
        "not see the load during their training: on a shared machine their times are not quiet-machine "
        "figures; only accuracy, parameters, FLOPs and growth counts are comparable."
        if reused
        else f"Times in the table were measured while other jobs shared the CPU (1-minute load average: median "
        f"{median:.1f}, up to {max(loads):.1f}, on {cores} cores, the runs' own threads included): they are "
        "**not** quiet-machine figures; only accuracy, parameters, FLOPs and growth counts are comparable."
        if busy
        else f"The machine was quiet (1-minute load average: median {median:.1f} on {cores} cores, the runs' "
        "own threads included)."
    )
    control = (
        ""
        if static
        else "\nThe static control was not re-run this time (`--without-static`: the machine was too busy for it), "
        "so the table has the Firefly run only.\n"
    )
    text = f"""# The README's default run

Regenerate everything in this folder with one command:

```bash
python benchmarks/default_run.py        # add --threads 1 on a machine shared with other jobs
```

It trains `fashion-vgg-firefly` (the README's command) and `fashion-vgg-static` (the same network and
schedule, never grown) into `runs/docs/` (about a minute each on 2 idle cores), reports them here with
`firefly report` and copies the Firefly run's `summary.json` as `run-summary.json` (and its `growth.jsonl` and
`metrics.jsonl`, without wall times, as `run-growth.jsonl` and `run-metrics.jsonl`). The numbers below
come from these commands, with torch {torch.__version__} on {platform.machine()} ({cores} cores available;
a run without `train.threads` uses {default_threads} intra-op threads here):

```bash
{chr(10).join(commands)}
firefly report {" ".join(f"{shown}/{n}" for n, _ in RUNS if (runs_dir / n).is_dir())} --out docs/default-run
```

Fashion-MNIST (20,000-image training subset, 5,000 test images), VGG-11 with BatchNorm and a 1×1-conv
classifier starting at 8 channels in every conv, SGD-Nesterov lr 0.05 restarted after each growth, Firefly
(default preset, budget 0.35 = 35 % more units per growth) after epochs 2, 4 and 6. Parameters at each
growth (`run-growth.jsonl`): {growth_steps(growths)}.
{batchnorm_sentence(growths)}

{table}

Firefly: {summary['final_test_acc']:.2%} test accuracy with {summary['params']:,} parameters after \
{summary['num_growths']} growths. {timing}
{control}
The intra-op thread count changes floating-point summation order and so the trajectory: the same command
with `--set train.threads=1` gives other (equally valid) numbers. One seed: the gap to the static run is a
single measurement, not a claim (see `docs/benchmarks.md` for seeded comparisons). Plots: `curves.png`
(loss/accuracy, growth marked), `acc_vs_params.png`, `widths.png`.
"""
    (docs / "README.md").write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "docs", help="where the two runs go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "default-run", help="the docs folder")
    ap.add_argument("--without-static", action="store_true", help="skip the static control (said in the README)")
    ap.add_argument("--threads", type=int, default=None, help="train.threads for the runs trained now")
    args = ap.parse_args()
    names = ["default"] if args.without_static else ["default", "static"]
    loads, reused = run_all(args.runs, names, args.threads)
    _firefly("report", *(str(args.runs / n) for n in names), "--out", str(args.out))
    summary = json.loads((args.runs / "default" / "summary.json").read_text())
    with contextlib.suppress(ValueError):  # a path inside the checkout is recorded relative to it
        summary["run_dir"] = str(Path(summary["run_dir"]).resolve().relative_to(ROOT))
    (args.out / "run-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in ("growth.jsonl", "metrics.jsonl"):  # the run's own records; their times are in the table
        lines = (args.runs / "default" / name).read_text().splitlines()
        records = [json.dumps(without_times(json.loads(line))) for line in lines if line.strip()]
        (args.out / f"run-{name}").write_text("".join(r + "\n" for r in records))
    table = (args.out / "report.md").read_text().split("\n\n")[1].strip()
    write_readme(args.out, args.runs, loads, reused, table, static=not args.without_static)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
