"""Compare training runs: a markdown table and PNG plots (matplotlib, Agg backend).

Reads each run directory's ``metrics.jsonl``, ``growth.jsonl`` and ``config.yaml`` (as written
by `firefly_descent.train`), so it also works on unfinished or killed runs, which the table marks as
incomplete ("2 of 5 (incomplete)"). A report is never written into a run directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .paths import is_run_dir

__all__ = [
    "ReportError",
    "RunData",
    "incomplete_note",
    "load_run",
    "make_report",
    "markdown_table",
    "summary_rows",
    "write_run_plots",
]


class ReportError(ValueError):
    """A run directory cannot be reported on (one-line message)."""


@dataclass
class RunData:
    """What the report needs from one run directory."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    growths: list[dict[str, Any]] = field(default_factory=list)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line of a killed run
    return rows


def load_run(path: str | Path) -> RunData:
    """Read one run directory."""
    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{p}: no such run directory")
    if not (p / "metrics.jsonl").is_file():
        raise ReportError(f"{p}: not a run directory (no metrics.jsonl)")
    config: dict[str, Any] = {}
    if (p / "config.yaml").is_file():
        try:
            config = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            config = {}
    name = p.name
    return RunData(
        path=p,
        name=name,
        config=config,
        metrics=_read_jsonl(p / "metrics.jsonl"),
        growths=_read_jsonl(p / "growth.jsonl"),
    )


def _unique_labels(runs: Sequence[RunData]) -> list[str]:
    labels = [r.name for r in runs]
    if len(set(labels)) == len(labels):
        return labels
    return [str(r.path) for r in runs]


def summary_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One dict per run: final/best test accuracy, params, FLOPs, growth count, times."""
    rows = []
    for label, r in zip(_unique_labels(runs), runs):
        m = r.metrics
        last = m[-1] if m else {}
        accs = [row["test_acc"] for row in m if row.get("test_acc") is not None]
        planned = (r.config.get("train") or {}).get("epochs")
        done = last.get("epoch", 0)
        rows.append(
            {
                "run": label,
                "method": (r.config.get("growth") or {}).get("method", "?"),
                "epochs": done,
                "planned_epochs": planned,
                "complete": not isinstance(planned, int) or done >= planned,
                "final_test_acc": last.get("test_acc"),
                "best_test_acc": max(accs) if accs else None,
                "final_test_loss": last.get("test_loss"),
                "params": last.get("params"),
                "flops": last.get("flops"),
                "growths": sum(1 for g in r.growths if _changed(g)),
                "total_time": last.get("elapsed"),
                "growth_time": float(sum(g.get("time", g.get("total_time", 0.0)) or 0.0 for g in r.growths)),
            }
        )
    return rows


def _changed(g: dict[str, Any]) -> bool:
    """Whether a growth step changed the model (the static control records no-op steps)."""
    return g.get("params_after") != g.get("params_before") or bool(g.get("layers_inserted"))


def _epochs(row: dict[str, Any]) -> str:
    """Epochs trained; for a run stopped early, of how many (an interrupted run is not a result)."""
    if row.get("complete", True):
        return str(row["epochs"])
    return f"{row['epochs']} of {row['planned_epochs']} (incomplete)"


def incomplete_note(row: dict[str, Any]) -> str | None:
    """One line saying a run stopped before its last epoch (and how to finish it), or None."""
    if row.get("complete", True):
        return None
    return (
        f"note: {row['run']} is incomplete ({row['epochs']} of {row['planned_epochs']} epochs); "
        "its numbers are not final (finish it with `firefly resume RUN_DIR`)"
    )


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _loss(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _int(v: int | None) -> str:
    return "–" if v is None else f"{int(v):,}"


def _secs(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}s"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary rows as a GitHub-markdown table."""
    header = [
        "run",
        "method",
        "epochs",
        "final test acc",
        "best test acc",
        "final test loss",
        "params",
        "FLOPs",
        "growths",
        "total time",
        "growth time",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for r in rows:
        cells = [
            str(r["run"]),
            str(r["method"]),
            _epochs(r),
            _pct(r["final_test_acc"]),
            _pct(r["best_test_acc"]),
            _loss(r["final_test_loss"]),
            _int(r["params"]),
            _int(r["flops"]),
            str(r["growths"]),
            _secs(r["total_time"]),
            _secs(r["growth_time"]),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_acc_vs_params(runs: Sequence[RunData], labels: Sequence[str], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # classification runs plot accuracy; when no run has one (regression), the test loss
    key = "test_acc" if any(row.get("test_acc") is not None for r in runs for row in r.metrics) else "test_loss"
    scale = 100 if key == "test_acc" else 1
    for label, r in zip(labels, runs):
        pts = [(row["params"], row[key]) for row in r.metrics if row.get("params") and row.get(key) is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, [scale * y for y in ys], marker=".", alpha=0.35, linewidth=1)
        ax.scatter([xs[-1]], [scale * ys[-1]], color=line.get_color(), s=60, zorder=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    what = "test accuracy" if key == "test_acc" else "test loss"
    ax.set_ylabel(what + (" (%)" if key == "test_acc" else ""))
    ax.set_title(f"{what.capitalize()} vs parameters (dots: final; lines: per epoch)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_curves(runs: Sequence[RunData], labels: Sequence[str], path: Path) -> Path:
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in zip(labels, runs):
        ep = [row["epoch"] for row in r.metrics]
        if not ep:
            continue
        (line,) = ax_loss.plot(ep, [row.get("test_loss") for row in r.metrics], marker=".", label=f"{label} test")
        color = line.get_color()
        ax_loss.plot(
            ep,
            [row.get("train_loss") for row in r.metrics],
            linestyle=":",
            color=color,
            label=f"{label} train",
        )
        accs = [row.get("test_acc") for row in r.metrics]
        if any(a is not None for a in accs):
            ax_acc.plot(
                ep,
                [math.nan if a is None else 100 * a for a in accs],
                marker=".",
                color=color,
                label=f"{label} test",
            )
            tr = [row.get("train_acc") for row in r.metrics]
            ax_acc.plot(
                ep,
                [math.nan if a is None else 100 * a for a in tr],
                linestyle=":",
                color=color,
                label=f"{label} train",
            )
        for g in filter(_changed, r.growths):
            for ax in (ax_loss, ax_acc):
                ax.axvline(g["epoch"] + 0.5, color=color, linestyle="--", alpha=0.5, linewidth=1)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss (dashed vertical lines: growth)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy (dashed vertical lines: growth)")
    if not any(row.get("test_acc") is not None for r in runs for row in r.metrics):  # regression: no accuracy
        ax_acc.text(0.5, 0.5, "no accuracy: regression runs", ha="center", va="center", transform=ax_acc.transAxes)
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _width_series(r: RunData) -> tuple[list[float], dict[str, list[float]]]:
    """x positions and per-group widths in model order: the start, then a step at each growth.

    Growth after epoch E is drawn at x = E + 0.5, where `curves.png` marks it; the series run from the
    first to the last trained epoch. Empty when no growth step changed the model (e.g. the static control)."""
    if not any(_changed(g) for g in r.growths):
        return [], {}
    points: list[tuple[float, dict[str, int]]] = []
    first_epoch = float(r.metrics[0]["epoch"]) if r.metrics else 1.0
    if r.growths and r.growths[0].get("widths_before"):
        points.append((min(first_epoch, r.growths[0]["epoch"] + 0.5), r.growths[0]["widths_before"]))
    for g in r.growths:
        if g.get("widths_after"):
            points.append((float(g["epoch"]) + 0.5, g["widths_after"]))
    if not points:
        return [], {}
    last_epoch = float(r.metrics[-1]["epoch"]) if r.metrics else points[-1][0]
    if last_epoch > points[-1][0]:
        points.append((last_epoch, points[-1][1]))
    names: list[str] = []  # first-seen order: the growth reports list groups in model order
    for _, w in points:
        names.extend(n for n in w if n not in names)
    xs = [p[0] for p in points]
    series = {n: [float(w.get(n, math.nan)) for _, w in points] for n in names}
    return xs, series


_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*")


def _plot_widths(runs: Sequence[RunData], labels: Sequence[str], path: Path) -> Path | None:
    """One panel per run that recorded widths (None, no file, when none did). Lines that coincide stay
    visible: each group has its own marker and dash pattern, earlier groups are drawn wider underneath,
    and the legend gives every group's start and end width."""
    from matplotlib.ticker import MaxNLocator

    panels = [(label, r, *_width_series(r)) for label, r in zip(labels, runs)]
    panels = [p for p in panels if p[3]]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, (label, r, xs, series) in zip(axes[:, 0], panels):
        n = len(series)
        for i, (name, ys) in enumerate(series.items()):
            start = next((int(y) for y in ys if y == y), 0)
            end = next((int(y) for y in reversed(ys) if y == y), 0)
            ax.step(
                xs,
                ys,
                where="post",
                linestyle=_STYLES[i % len(_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)],
                markersize=4,
                linewidth=1.0 + 2.0 * (n - 1 - i) / max(n - 1, 1),
                alpha=0.85,
                label=f"{name} ({start}\u2192{end})" if end != start else f"{name} ({start})",
                zorder=2 + i,
            )
        for g in filter(_changed, r.growths):
            ax.axvline(g["epoch"] + 0.5, color="0.5", linestyle="--", alpha=0.5, linewidth=1, zorder=1)
        ax.set_title(f"{label}: per-layer widths (dashed vertical lines: growth)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("width (units)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(series) <= 24:
            ax.legend(fontsize=6, ncol=2 if n > 12 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_run_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """A single run's ``curves.png``, ``acc_vs_params.png`` and (if it recorded widths) ``widths.png``,
    written into the run directory (or `out_dir`); `firefly train` and `firefly resume` call this."""
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    labels = [run.name]
    plots = [
        _plot_curves([run], labels, out / "curves.png"),
        _plot_acc_vs_params([run], labels, out / "acc_vs_params.png"),
        _plot_widths([run], labels, out / "widths.png"),
    ]
    return [p for p in plots if p is not None]


def make_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and ``acc_vs_params.png``, ``curves.png``, ``widths.png`` (when a run recorded
    widths) to `out_dir`.

    Returns ``{"table": markdown, "rows": [...], "markdown": path, "plots": [paths]}``.
    """
    out = Path(out_dir)
    if is_run_dir(out):
        raise ReportError(f"--out {out}: is a training run's folder; write the report somewhere else")
    runs = [load_run(p) for p in run_dirs]
    rows = summary_rows(runs)
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    labels = _unique_labels(runs)
    plots = [
        _plot_acc_vs_params(runs, labels, out / "acc_vs_params.png"),
        _plot_curves(runs, labels, out / "curves.png"),
        _plot_widths(runs, labels, out / "widths.png"),
    ]
    plots = [p for p in plots if p is not None]
    md = ["# firefly-descent report", "", table, ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md.append("")
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=float) + "\n", encoding="utf-8")
    return {"table": table, "rows": rows, "markdown": out / "report.md", "plots": plots}
