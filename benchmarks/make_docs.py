"""Generate docs/benchmarks.md (tables) and docs/img/*.png (plots) from the benchmark result files ONLY.

    python benchmarks/make_docs.py                                   # full-preset results in benchmarks/results
    python benchmarks/make_docs.py --preset quick --results benchmarks/results-quick --out /tmp/bench.md

Nothing is estimated: a (method, seed) without a result file is listed as "not run", a failed run as
"failed". The discussion section is preserved: it is read from benchmarks/discussion.md when that file
exists, else kept from the previous docs/benchmarks.md between the discussion markers.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firefly_descent.io import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from results_io import default_results, load_results, rel  # noqa: E402  (benchmarks/results_io.py)
from suite_defs import PRESETS, SUITES, Suite  # noqa: E402  (benchmarks/suite_defs/: the suites as data)

START = "<!-- discussion:start (kept by make_docs.py; edit benchmarks/discussion.md) -->"
END = "<!-- discussion:end -->"
PLACEHOLDER = "_No discussion yet: write it in `benchmarks/discussion.md` and re-run `benchmarks/make_docs.py`._"

__all__ = ["generate", "main"]


# --------------------------------------------------------------------------- formatting


def _stats(values: Sequence[float | None]) -> tuple[float, float | None, int] | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    sd = statistics.stdev(vals) if len(vals) > 1 else None
    return statistics.fmean(vals), sd, len(vals)


def _fmt(values: Sequence[float | None], kind: str) -> str:
    """mean ± std (std only with 2+ values) in the unit of `kind`: pct, int, flops, s, min, mb, x."""
    st = _stats(values)
    if st is None:
        return "–"
    mean, sd, _ = st
    conv: dict[str, Callable[[float], str]] = {
        "pct": lambda v: f"{100 * v:.2f}",
        "int": lambda v: f"{v:,.0f}",
        "s": lambda v: f"{v:.2f}" if v < 100 else f"{v:.0f}",
        "mb": lambda v: f"{v / 2**20:.1f}",
        "x": lambda v: f"{v:.2f}",
        "si": _si,
    }
    f = conv[kind]
    return f"{f(mean)} ± {f(sd)}" if sd is not None else f(mean)


def _si(v: float) -> str:
    """1234 -> 1.23 k, 4.5e6 -> 4.50 M."""
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{suffix}"
    return f"{v:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _seeds(recs: Sequence[dict[str, Any]]) -> str:
    return ", ".join(str(r["seed"]) for r in recs)


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _round_stats(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round index: params, FLOPs, accuracies and growth time over seeds (only rounds all seeds reached)."""
    n = min((len(r.get("rounds") or []) for r in recs), default=0)
    out = []
    for i in range(n):
        rows = [r["rounds"][i] for r in recs]
        out.append(
            {
                "round": i,
                "epoch": rows[0].get("epoch"),
                "params": [x.get("params") for x in rows],
                "flops": [x.get("flops") for x in rows],
                "acc_after": [x.get("test_acc_after_growth") for x in rows],
                "acc": [x.get("test_acc") for x in rows],
                "time": [x.get("growth_time") for x in rows],
            }
        )
    return out


def plot_acc_vs_params(suite: Suite, ok: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Fig. 4a-style: test accuracy at the end of each growth phase vs parameters (log-x)."""
    if not ok:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "os^vD<>pPX*h"
    # tab20 holds ten dark/light pairs: the first ten methods take the dark shades, the next ten the light
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(n for n in suite.methods if n in ok):
        recs, m = ok[name], suite.methods[name]
        rounds = _round_stats(recs)
        if not rounds:
            continue
        if m.kind != "grow":
            rounds = rounds[-1:]
        xs = [_stats(r["params"]) for r in rounds]
        ys = [_stats(r["acc"]) for r in rounds]
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
        if not pts:
            continue
        ax.errorbar(
            [p[0][0] for p in pts],
            [100 * p[1][0] for p in pts],
            yerr=[100 * (p[1][1] or 0.0) for p in pts],
            marker=markers[i % len(markers)],
            color=colors[(2 * i + i // 10) % len(colors)],
            linestyle="-" if m.kind == "grow" else "none",
            markersize=7 if m.kind == "grow" else 10,
            capsize=3,
            label=f"{name} (n={len(recs)})",
        )
    return _save_accuracy_plot(
        plt, fig, ax, path, "parameters (log scale)", f"Suite {suite.name}: accuracy vs size after each growth round"
    )


def _save_accuracy_plot(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, title: str) -> bool:
    """Finish a log-x accuracy plot (labels, grid, legend) and write it to `path`."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def training_flops(rec: dict[str, Any]) -> list[tuple[float, float]]:
    """(cumulative training FLOPs, test accuracy) after each epoch of one run: 3x the forward FLOPs per sample
    (forward and backward) times the training samples, per epoch at that epoch's size, plus each growth step
    charged as its wall time in epochs of the epoch that follows it (its FLOPs are not counted directly)."""
    d = rec.get("config", {}).get("data", {})
    n = rec.get("train_samples")
    if n is None:
        n = round((d.get("train_subset") or 0) * (1 - (d.get("val_fraction") or 0.0)))
    total, out = 0.0, []
    for row in rec.get("metrics") or []:
        if row.get("flops") is None or row.get("test_acc") is None or not n:
            return []
        epoch = 3.0 * float(row["flops"]) * n
        if row.get("growth_time") and row.get("epoch_time"):
            total += epoch * float(row["growth_time"]) / float(row["epoch_time"])
        total += epoch
        out.append((total, float(row["test_acc"])))
    return out


def plot_acc_vs_compute(suite: Suite, ok: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """The compute-matched view: test accuracy against total training FLOPs (growth included), mean over seeds
    per epoch; static networks of the start, wider sizes and each final architecture next to the growers."""
    curves = {}
    for name in (n for n in suite.methods if n in ok):
        runs = [training_flops(r) for r in ok[name]]
        runs = [c for c in runs if c]
        if runs:
            k = min(len(c) for c in runs)
            curves[name] = [
                (sum(c[i][0] for c in runs) / len(runs), 100 * sum(c[i][1] for c in runs) / len(runs))
                for i in range(k)
            ]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, pts) in enumerate(curves.items()):
        m = suite.methods[name]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color=colors[(2 * i + i // 10) % len(colors)],
            linestyle="-" if m.kind in ("grow", "matched") else "--",
            label=f"{name} (n={len(ok[name])})",
        )
    return _save_accuracy_plot(
        plt,
        fig,
        ax,
        path,
        "total training FLOPs (forward + backward, growth steps charged at their wall time)",
        f"Suite {suite.name}: accuracy vs training compute (mean over seeds)",
    )


def plot_bars(
    labels: Sequence[str], values: Sequence[Sequence[float]], path: Path, ylabel: str, title: str, log: bool
) -> bool:
    """Fig. 4b-style bar chart (mean ± std per method)."""
    pairs = [(lab, _stats(v)) for lab, v in zip(labels, values)]
    pairs = [(lab, st) for lab, st in pairs if st is not None]
    if not pairs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(pairs) + 2), 4.5))
    means = [st[0] for _, st in pairs]
    errs = [st[1] or 0.0 for _, st in pairs]
    bars = ax.bar(range(len(pairs)), means, yerr=errs, capsize=3, color="tab:blue")
    ax.bar_label(bars, labels=[f"{m:.3g}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([lab for lab, _ in pairs], rotation=35, ha="right", fontsize=8)
    if log and min(means) > 0:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- sections


def _missing(suite: Suite, ok: dict[str, list[dict[str, Any]]], preset: str) -> list[tuple[str, list[int]]]:
    seeds = sorted(set(suite.seeds[preset]) | {r["seed"] for recs in ok.values() for r in recs})
    out = []
    for name in suite.methods:
        have = {r["seed"] for r in ok.get(name, [])}
        miss = [s for s in seeds if s not in have]
        if miss:
            out.append((name, miss))
    return out


def _provenance(recs: list[dict[str, Any]]) -> list[str]:
    lines = []
    envs = sorted(
        {
            (
                e.get("cpu", ""),
                e.get("cpus"),
                e.get("threads"),
                e.get("device", ""),
                e.get("gpu") or "",
                e.get("torch", ""),
                e.get("platform", ""),
            )
            for e in (r.get("env", {}) for r in recs)
        },
        key=str,
    )
    for cpu, cpus, threads, device, gpu, torch_v, plat in envs:
        dev = f"{device} {gpu}".strip()
        lines.append(f"- machine: {cpu or 'unknown CPU'}, {cpus} cores, {threads} torch threads, {dev}; "
                     f"torch {torch_v}; {plat}")  # fmt: skip
    dates = sorted(r.get("date", "")[:10] for r in recs if r.get("date"))
    if dates:
        lines.append(f"- dates: {dates[0]} to {dates[-1]}" if dates[0] != dates[-1] else f"- date: {dates[0]}")
    codes: dict[str, int] = {}
    for r in recs:
        code = r.get("env", {}).get("code") or "not recorded (before results recorded their commit)"
        codes[code] = codes.get(code, 0) + 1
    lines.append("- code: " + "; ".join(f"`{c}` ({n} run{'s' if n > 1 else ''})" for c, n in sorted(codes.items())))
    commands = sorted({r.get("command") or "" for r in recs} - {""})
    if commands:
        lines.append("- commands:")
        lines += [f"  - `{c}`" for c in commands]
    return lines


# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
PAIRED_REFERENCES = ("random", "random-matched", "tiny", "tiny-matched")  # what a growth method's decisions must beat


def ci95(values: Sequence[float]) -> tuple[float, float, float] | None:
    """Mean and the 95 % t confidence interval of the mean (None with fewer than 2 values)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = T975[min(len(values) - 1, len(T975)) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    if len(values) - 1 > len(T975):
        half *= 1.96 / T975[-1]
    return mean, mean - half, mean + half


def _after(rec: dict[str, Any], k: int, key: str) -> float | None:
    """Mean over a run's growths of `key` (e.g. test_acc) k epochs after each growth (None if any is missing)."""
    by_epoch = {m["epoch"]: m for m in rec.get("metrics", [])}
    vals = []
    for g in rec.get("growths", []):
        row = (g.get("after_epochs") or {}).get(str(k)) or by_epoch.get(g["epoch"] + k)
        if row is None or row.get(key) is None:
            return None
        vals.append(float(row[key]))
    return statistics.fmean(vals) if vals else None


def _heldout(rec: dict[str, Any]) -> float | None:
    """Mean over a run's growths of the held-out (train-mode) loss change right after growing."""
    vals = [g.get("heldout_loss_change") for g in rec.get("growths", [])]
    return statistics.fmean(vals) if vals and all(v is not None for v in vals) else None


PAIRED_METRICS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], float], ...] = (
    ("final test acc (pt)", lambda r: r["summary"].get("final_test_acc"), 100.0),
    ("test acc 1 epoch after growth (pt)", lambda r: _after(r, 1, "test_acc"), 100.0),
    ("test acc 3 epochs after growth (pt)", lambda r: _after(r, 3, "test_acc"), 100.0),
    ("held-out loss change at growth", _heldout, 1.0),
)


def _ci_text(values: Sequence[float], scale: float) -> str:
    c = ci95(values)
    if c is None:
        return "–"
    digits = 2 if scale != 1.0 else 4
    mean, lo, hi = (scale * v for v in c)
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _paired_section(suite: Suite, ok: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Paired differences (method − reference, same seed) with 95 % CIs, for each growth method against
    random growth, matched-placement random growth and TINY, and the held-out loss change at each growth."""
    refs = [r for r in PAIRED_REFERENCES if r in ok]
    grow = [n for n, m in suite.methods.items() if m.kind in ("grow", "matched") and n in ok]
    if not refs or len(grow) < 2:
        return []
    rows = []
    for name in grow:
        mine = {r["seed"]: r for r in ok[name]}
        for ref in refs:
            if ref == name or (name in refs and refs.index(name) < refs.index(ref)):
                continue  # each pair of references once (the later one against the earlier)
            theirs = {r["seed"]: r for r in ok[ref]}
            seeds = sorted(set(mine) & set(theirs))
            if len(seeds) < 2:
                continue
            cells = []
            for _, fn, scale in PAIRED_METRICS:
                diffs = [fn(mine[s]) - fn(theirs[s]) for s in seeds
                         if fn(mine[s]) is not None and fn(theirs[s]) is not None]
                cells.append(_ci_text(diffs, scale))
            final = [mine[s]["summary"]["final_test_acc"] - theirs[s]["summary"]["final_test_acc"] for s in seeds]
            wins = sum(d > 0 for d in final)
            rows.append([f"`{name}`", f"`{ref}`", str(len(seeds)), *cells, f"{wins}/{len(seeds)}"])
    lines = [
        "#### Paired differences against random growth, matched-placement random and TINY",
        "",
        "Each cell: mean of (method − reference) over the seeds both ran, and its 95 % t confidence interval; "
        "an interval that excludes 0 is a difference these seeds resolve. Accuracy after growth is averaged over "
        "the growth rounds (1 and 3 epochs after each); the held-out loss change is the train-mode loss on the "
        "growth data's held-out check batches right after growing, also averaged over rounds (negative: growth "
        "lowered it).",
        "",
    ]
    lines += _table(["method", "vs", "n", *[m[0] for m in PAIRED_METRICS], "final acc wins"], rows)
    lines.append("")
    hrows = []
    for name in grow:
        vals = [v for v in (_heldout(r) for r in ok[name]) if v is not None]
        per = []  # summed over rounds, per 1,000 parameters added over the whole run
        for r in ok[name]:
            h, rounds = _heldout(r), r.get("rounds") or []
            if h is not None and rounds:
                per.append(h * len(r["growths"]) / max(r["summary"]["params"] - rounds[0]["params"], 1) * 1000)
        hrows.append([f"`{name}`", str(len(vals)), _ci_text(vals, 1.0), _ci_text(per, 1.0)])
    lines += ["Held-out loss change right after growth (mean over rounds, 95 % CI over seeds):", ""]
    lines += _table(["method", "n", "loss change per growth", "per 1,000 added parameters (whole run)"], hrows)
    lines.append("")
    return lines


def _training_section(
    suite: Suite, ok: dict[str, list[dict[str, Any]]], preset: str, img_dir: Path, out: Path
) -> list[str]:
    lines: list[str] = []
    rows = []
    for name, m in suite.methods.items():
        recs = ok.get(name, [])
        if not recs:
            rows.append([f"`{name}`", "0", "not run", "not run", "not run", "not run", "not run", "not run", m.note])
            continue
        sm = [r["summary"] for r in recs]
        rows.append(
            [
                f"`{name}`",
                f"{len(recs)} ({_seeds(recs)})",
                _fmt([s.get("final_test_acc") for s in sm], "pct"),
                _fmt([s.get("best_test_acc") for s in sm], "pct"),
                _fmt([s.get("params") for s in sm], "int"),
                _fmt([s.get("flops") for s in sm], "si"),
                _fmt([s.get("growth_time") for s in sm], "s"),
                _fmt([r.get("wall_time_s") for r in recs], "s"),
                m.note,
            ]
        )
    lines.append("#### Final results (mean ± std over seeds)")
    lines.append("")
    lines += _table(
        [
            "method",
            "n (seeds)",
            "final test acc (%)",
            "best test acc (%)",
            "params",
            "FLOPs / sample",
            "total growth time (s)",
            "wall time (s)",
            "notes",
        ],
        rows,
    )
    lines.append("")
    if not ok:
        return lines + ["_Per-round table and plots: not run (no results)._", ""]
    lines += _paired_section(suite, ok)
    lines.append("#### At each growth round (mean ± std over seeds)")
    lines.append("")
    lines.append(
        'Round 0 is the starting network; round k is the network right after the k-th growth. "acc after '
        'growth" is measured right after growing (after the BatchNorm refresh, if any; before any training); "acc '
        'end of round" at the last epoch before the next growth (or the last epoch).'
    )
    lines.append("")
    rrows = []
    for name in suite.methods:
        recs = ok.get(name, [])
        if not recs:
            rrows.append([f"`{name}`", "–", "–", "not run", "not run", "not run", "not run", "not run", "0"])
            continue
        for r in _round_stats(recs):
            rrows.append(
                [
                    f"`{name}`",
                    str(r["round"]),
                    str(r["epoch"]) if r["round"] else "start",
                    _fmt(r["params"], "int"),
                    _fmt(r["flops"], "si"),
                    _fmt(r["acc_after"], "pct") if r["round"] else "–",
                    _fmt(r["acc"], "pct"),
                    _fmt(r["time"], "s") if r["round"] else "–",
                    str(len(recs)),
                ]
            )
    lines += _table(
        [
            "method",
            "round",
            "after epoch",
            "params",
            "FLOPs / sample",
            "acc after growth (%)",
            "acc end of round (%)",
            "growth time (s)",
            "n",
        ],
        rrows,
    )
    lines.append("")
    fig_a = img_dir / f"suite-{suite.name}-acc-vs-params.png"
    fig_b = img_dir / f"suite-{suite.name}-growth-time.png"
    if plot_acc_vs_params(suite, ok, fig_a):
        lines.append(f"![Suite {suite.name}: accuracy vs parameters]({_relpath(fig_a, out)})")
        lines.append("")
    else:
        lines.append("_Accuracy-vs-parameters plot: not run (no results)._")
        lines.append("")
    fig_c = img_dir / f"suite-{suite.name}-acc-vs-compute.png"
    if suite.compute_view and plot_acc_vs_compute(suite, ok, fig_c):
        lines.append(
            "Accuracy against total training compute (grow, or train a network of the final size from the start?):"
        )
        lines.append("")
        lines.append(f"![Suite {suite.name}: accuracy vs training compute]({_relpath(fig_c, out)})")
        lines.append("")
    grow = [n for n, m in suite.methods.items() if m.kind == "grow" and n in ok]
    if plot_bars(
        grow,
        [[r["summary"].get("growth_time") for r in ok[n]] for n in grow],
        fig_b,
        "total growth time per run (s)",
        f"Suite {suite.name}: time spent growing (all rounds)",
        log=True,
    ):
        lines.append(f"![Suite {suite.name}: growth time]({_relpath(fig_b, out)})")
        lines.append("")
    return lines


def _cost_section(suite: Suite, ok: dict[str, list[dict[str, Any]]], img_dir: Path, out: Path) -> list[str]:
    lines = ["#### Cost of one growth step (mean ± std over seeds)", ""]
    rows = []
    for name, m in suite.methods.items():
        recs = ok.get(name, [])
        if not recs:
            rows.append([f"`{name}`", "0"] + ["not run"] * 7 + [m.note])
            continue
        c = [r["cost"] for r in recs]
        rows.append(
            [
                f"`{name}`",
                f"{len(recs)} ({_seeds(recs)})",
                _fmt([x.get("epoch_s") for x in c], "s"),
                _fmt([x.get("growth_s") for x in c], "s"),
                _fmt([x.get("growth_over_epoch") for x in c], "x"),
                _fmt([x.get("params_after", 0) - x.get("params_before", 0) for x in c], "int"),
                _fmt([x.get("train_step_peak_bytes") for x in c], "mb"),
                _fmt([x.get("growth_peak_bytes") for x in c], "mb"),
                _fmt([x.get("growth_over_train_memory") for x in c], "x"),
                m.note,
            ]
        )
    lines += _table(
        [
            "method",
            "n (seeds)",
            "training epoch (s)",
            "growth step (s)",
            "growth ÷ epoch",
            "params added",
            "train-step peak (MiB)",
            "growth peak (MiB)",
            "growth ÷ train memory",
            "notes",
        ],
        rows,
    )
    lines.append("")
    fig = img_dir / f"suite-{suite.name}-growth-cost.png"
    names = [n for n in suite.methods if n in ok]
    if plot_bars(
        names,
        [[r["cost"].get("growth_over_epoch") for r in ok[n]] for n in names],
        fig,
        "growth time ÷ training epoch",
        "Suite C: time of one growth step, in training epochs",
        log=True,
    ):
        lines.append(f"![Suite C: growth time in epochs]({_relpath(fig, out)})")
    else:
        lines.append("_Growth-time bar chart: not run (no results)._")
    lines.append("")
    return lines


def _relpath(target: Path, out: Path) -> str:
    return Path(os.path.relpath(target.resolve(), out.resolve().parent)).as_posix()


def _discussion(discussion: Path | None, out: Path) -> str:
    if discussion is not None and discussion.is_file():
        return discussion.read_text(encoding="utf-8").strip()
    if out.is_file():
        m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), out.read_text(encoding="utf-8"), re.S)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return PLACEHOLDER


def generate(
    results: Path,
    preset: str = "full",
    out: Path | None = None,
    img_dir: Path | None = None,
    discussion: Path | None = None,
    suite_names: Sequence[str] | None = None,
) -> str:
    """Write the markdown file (and PNGs) for `preset`'s results under `results`; return the markdown."""
    out = Path(out) if out is not None else ROOT / "docs" / "benchmarks.md"
    img_dir = Path(img_dir) if img_dir is not None else out.parent / "img"
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by benchmarks/make_docs.py from the JSON result files; do not edit by hand "
        "(except through benchmarks/discussion.md) -->",
        "",
        f"Generated from the `{preset}`-preset result files in `{rel(results)}` by "
        "`python benchmarks/make_docs.py`. Every number below comes from a result file; anything without one "
        "is listed as **not run** (never estimated). Reproduce a suite with "
        f"`python benchmarks/suites.py --suite <{'|'.join(SUITES)}> --preset {preset}` (finished runs are "
        "skipped; each result file also records the single-run command; suite F also takes `--cifar10 PATH`).",
        "",
        "Methods: Firefly (default preset and the released code's settings, `paper-code`), its splits-only and "
        "new-neurons-only ablations, Net2Net, random new units, NASH, exact and fast splitting steepest descent, "
        "GradMax, TINY; the placement control (random new units exactly where Firefly grew); controls: the small "
        "network never grown, the final Firefly architecture trained from scratch, and a wide static network. All "
        "growth methods share one budget: 35% more neurons per round.",
        "",
    ]
    all_recs: list[dict[str, Any]] = []
    for name in suite_names or list(SUITES):
        suite = SUITES[name]
        ok, failed, other = load_results(results, name, preset)
        recs = [r for rs in ok.values() for r in rs]
        all_recs += recs
        lines += [f"## Suite {name}: {suite.title}", "", suite.description, ""]
        lines.append(f"Sizes ({preset} preset): {suite.sizes.get(preset, '')}.")
        lines.append("")
        if suite.base is None:
            lines += _cost_section(suite, ok, img_dir, out)
        else:
            lines += _training_section(suite, ok, preset, img_dir, out)
        missing = _missing(suite, ok, preset)
        if missing:
            lines.append("**Not run:** " + "; ".join(f"`{m}` (seeds {', '.join(map(str, s))})" for m, s in missing))
            lines.append("")
        if failed:
            lines.append("**Failed** (retried on the next run of the suite):")
            for f in failed:
                err = " ".join(str(f.get("error", "")).split())[:200]
                lines.append(f"- `{f['method']}` seed {f['seed']}: {err}")
            lines.append("")
        if other:
            lines.append(f"_{other} result file(s) of another preset ignored._")
            lines.append("")
        if recs:
            lines.append("Provenance:")
            lines.append("")
            lines += _provenance(recs)
            lines.append("")
    lines += ["## Discussion", "", START, _discussion(discussion, out), END, ""]
    text = "\n".join(lines)
    atomic_write_text(out, text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/make_docs.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="full")
    ap.add_argument("--results", type=Path, default=None, help="default: the preset's default results folder")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--img", type=Path, default=None, help="PNG folder (default: img/ next to --out)")
    ap.add_argument("--discussion", type=Path, default=HERE / "discussion.md")
    ap.add_argument("--suites", default=None, help="comma-separated subset of suites (default: all)")
    args = ap.parse_args(argv)
    results = args.results if args.results is not None else default_results(args.preset)
    names = [s.strip() for s in args.suites.split(",")] if args.suites else None
    generate(results, args.preset, args.out, args.img, args.discussion, names)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
