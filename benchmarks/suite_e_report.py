"""Suite E's report: Firefly width + depth against each other method, paired by seed, at the parameters each
ended with; the share of every Firefly round's budget spent on depth; which blocks were inserted and why.

    python benchmarks/suite_e_report.py                     # benchmarks/results/E -> benchmarks/results/E/SUMMARY.md
    python benchmarks/suite_e_report.py --suite E-fmnist    # the Fashion-MNIST variant

Writes ``<results>/<suite>/SUMMARY.md`` and ``acc_vs_params.png`` next to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_docs  # noqa: E402
from results_io import load_results  # noqa: E402
from suite_defs import PRESETS, SUITES  # noqa: E402

REFERENCE = "firefly-wd"


def _final(rec: dict[str, Any]) -> float:
    return float(rec["summary"]["final_test_acc"])


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    if len(values) < 2:
        return f"{scale * values[0]:.{digits}f}" if values else "–"
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _ci(values: Sequence[float]) -> str:
    c = make_docs.ci95(values)
    if c is None:
        return "–"
    return f"{100 * c[0]:+.2f} [{100 * c[1]:+.2f}, {100 * c[2]:+.2f}]"


def depth_rounds(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per growth round of a Firefly run with depth candidates: blocks kept, the depth share of the spent
    budget, the best block's and the best width candidate's score per cost."""
    out = []
    for i, g in enumerate(rec.get("growths", []), start=1):
        d = (g.get("extra") or {}).get("depth")
        if not d:
            continue
        blocks = d["blocks"]
        best = min(blocks, key=lambda b: b["score_per_cost"]) if blocks else None
        out.append(
            {
                "round": i,
                "kept": [b for b in blocks if b["kept"]],
                "share": d["depth_share"],
                "best_block": best,
                "best_width": d.get("best_width_score_per_cost"),
                "accepted": g.get("outcome", "accepted"),
            }
        )
    return out


def report(results: Path, suite_name: str, preset: str = "full") -> str:
    suite = SUITES[suite_name]
    ok, failed, _ = load_results(results, suite_name, preset)
    folder = results / suite_name
    lines = [f"# Suite {suite_name}: {suite.title}", "", suite.description, ""]
    if not ok:
        return "\n".join(lines + ["No results yet.", ""])
    cmds = sorted({r["command"] for recs in ok.values() for r in recs})
    lines += ["Commands that produced these results:", ""] + [f"    {c}" for c in cmds] + [""]
    lines += ["## Final test accuracy and size", ""]
    rows = []
    for name in (n for n in suite.methods if n in ok):
        recs = ok[name]
        rows.append(
            [
                f"`{name}`",
                str(len(recs)),
                _pm([_final(r) for r in recs]),
                f"{statistics.fmean(r['summary']['params'] for r in recs):,.0f}",
                suite.methods[name].note,
            ]
        )
    lines += make_docs._table(["method", "n", "test acc % (mean ± sd)", "params (mean)", "what"], rows) + [""]
    if REFERENCE in ok:
        mine = {r["seed"]: r for r in ok[REFERENCE]}
        lines += [
            f"## Paired differences: `{REFERENCE}` − other (same seed)",
            "",
            "Mean of the per-seed difference in final test accuracy (points) and its 95 % t interval; params: "
            f"`{REFERENCE}`'s final parameters minus the other's (mean).",
            "",
        ]
        rows = []
        for name in (n for n in suite.methods if n in ok and n != REFERENCE):
            theirs = {r["seed"]: r for r in ok[name]}
            seeds = sorted(set(mine) & set(theirs))
            diffs = [_final(mine[s]) - _final(theirs[s]) for s in seeds]
            dparams = [mine[s]["summary"]["params"] - theirs[s]["summary"]["params"] for s in seeds]
            rows.append(
                [
                    f"`{name}`",
                    str(len(seeds)),
                    _ci(diffs),
                    f"{sum(d > 0 for d in diffs)}/{len(seeds)}",
                    ", ".join(f"{100 * d:+.1f}" for d in diffs),
                    f"{statistics.fmean(dparams):+,.0f}" if dparams else "–",
                ]
            )
        lines += make_docs._table(
            ["vs", "n", "Δ acc (pt) [95 % CI]", "ahead", "per seed (pt)", "Δ params"], rows
        ) + [""]
    lines += [
        "## Depth decisions of Firefly",
        "",
        "Per run and growth round: the blocks inserted (with their score per cost: predicted loss change per "
        "parameter), the share of the round's spent budget that went to depth, and the best block's and the best "
        "width candidate's score per cost (more negative = more loss decrease per parameter).",
        "",
    ]
    rows = []
    chosen = total = 0
    for name in ("firefly-wd", "firefly-depth"):
        for rec in ok.get(name, []):
            for r in depth_rounds(rec):
                total += name == "firefly-wd"
                chosen += bool(r["kept"]) and name == "firefly-wd"
                kept = "; ".join(
                    f"{b['type']} after `{b['after']}` ({b['score_per_cost']:.2e}/param, {b['cost']:,.0f} params)"
                    for b in r["kept"]
                )
                best = r["best_block"]
                rows.append(
                    [
                        f"`{name}`",
                        str(rec["seed"]),
                        str(r["round"]),
                        kept or "none",
                        f"{100 * r['share']:.0f} %",
                        f"{best['score_per_cost']:.2e} ({best['type']} after `{best['after']}`)" if best else "–",
                        f"{r['best_width']:.2e}" if r["best_width"] is not None else "–",
                    ]
                )
    lines += make_docs._table(
        ["method", "seed", "round", "blocks inserted", "depth share", "best block /param", "best width /param"], rows
    )
    lines += ["", f"`firefly-wd` inserted at least one block in {chosen} of its {total} rounds.", ""]
    if make_docs.plot_acc_vs_params(suite, ok, folder / "acc_vs_params.png"):
        lines += ["![accuracy vs parameters](acc_vs_params.png)", ""]
    if failed:
        lines += ["Failed runs: " + ", ".join(f"{f['method']}-s{f['seed']}" for f in failed), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="E", choices=[s for s in SUITES if s.startswith("E")])
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--preset", default="full", choices=PRESETS)
    args = ap.parse_args(argv)
    text = report(args.results, args.suite, args.preset)
    out = args.results / args.suite / "SUMMARY.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
