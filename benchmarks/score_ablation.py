"""Issue 26: step two's per-candidate score path against the joint path, paired by seed.

    python benchmarks/suites.py --suite B --preset full --methods firefly,firefly-per-candidate-score \\
        --seeds $(seq 0 19) --results benchmarks/results/issue26
    python benchmarks/score_ablation.py --results benchmarks/results/issue26 --out benchmarks/results/issue26/summary.md

Both variants share everything before step two (same candidates, same step one, same batches), so a seed's pair
differs only in the score; both rows are rerun with the same code, so the pairing is exact. Each cell is the mean
over seeds of (per-candidate - joint) with its 95 % t interval (make_docs.ci95).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from make_docs import _after, _heldout, ci95  # noqa: E402  (benchmarks/make_docs.py)
from results_io import read_json, rel  # noqa: E402

JOINT, PER = "firefly", "firefly-per-candidate-score"


def _mean_growth(rec: dict[str, Any], key: str) -> float | None:
    vals = [g.get(key) for g in rec.get("growths", [])]
    return statistics.fmean(vals) if vals and all(v is not None for v in vals) else None


METRICS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], float, str], ...] = (
    ("final test acc (pt)", lambda r: r["summary"]["final_test_acc"], 100.0, "{:+.2f}"),
    ("held-out loss change right after growth", _heldout, 1.0, "{:+.4f}"),
    ("test loss right after growth", lambda r: _mean_growth(r, "test_loss_after"), 1.0, "{:+.4f}"),
    ("test loss 3 epochs after growth", lambda r: _after(r, 3, "test_loss"), 1.0, "{:+.4f}"),
    ("test acc 3 epochs after growth (pt)", lambda r: _after(r, 3, "test_acc"), 100.0, "{:+.2f}"),
    ("final params", lambda r: r["summary"]["params"], 1.0, "{:+.0f}"),
    ("growth time, 3 steps (s)", lambda r: r["summary"]["growth_time"], 1.0, "{:+.1f}"),
)


def _runs(results: Path, suite: str, method: str) -> dict[int, dict[str, Any]]:
    out = {}
    for path in sorted((results / suite).glob(f"{method}-s*.json")):
        tail = path.stem[len(method) + 2 :]
        if tail.isdigit() and (rec := read_json(path)) is not None and rec.get("method") == method:
            out[int(tail)] = rec
    return out


def _cell(values: Sequence[float], scale: float, fmt: str) -> str:
    c = ci95(values)
    if c is None:
        return "–"
    mean, lo, hi = (scale * v for v in c)
    return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _decision_stats(recs: Sequence[dict[str, Any]]) -> str:
    """Mean over growth steps of how far the per-candidate path moved the selection from the joint one."""
    rho, share = [], []
    for r in recs:
        for g in r.get("growths", []):
            info = (g.get("extra") or {}).get("score_path") or {}
            if "spearman_with_joint" in info:
                rho.append(info["spearman_with_joint"])
                share.append(info["kept_also_by_joint"] / max(info["kept_joint"], 1))
    if not rho:
        return ""
    return (
        f"Over {len(rho)} growth steps: Spearman correlation of the two scores {statistics.fmean(rho):.2f} "
        f"(min {min(rho):.2f}); {100 * statistics.fmean(share):.0f} % of the joint path's selection also kept."
    )


def summarise(results: Path, suites: Sequence[str]) -> str:
    lines = []
    for suite in suites:
        joint, per = _runs(results, suite, JOINT), _runs(results, suite, PER)
        seeds = sorted(set(joint) & set(per))
        lines += [f"#### Suite {suite}: per-candidate − joint (n = {len(seeds)} paired seeds: "
                  f"{', '.join(map(str, seeds)) or 'none'})", ""]
        if not seeds:
            lines += ["_Not run._", ""]
            continue
        lines += ["| metric | joint (mean) | per-candidate (mean) | per-candidate − joint [95 % CI] | "
                  "per-candidate higher |", "|---|---:|---:|---|---:|"]
        for name, fn, scale, fmt in METRICS:
            pairs = [(fn(per[s]), fn(joint[s])) for s in seeds]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                continue
            diffs = [a - b for a, b in pairs]
            mj = scale * statistics.fmean(b for _, b in pairs)
            mp = scale * statistics.fmean(a for a, _ in pairs)
            plain = fmt.replace("+", "")
            lines.append(f"| {name} | {plain.format(mj)} | {plain.format(mp)} | {_cell(diffs, scale, fmt)} | "
                         f"{sum(d > 0 for d in diffs)}/{len(diffs)} |")
        lines += ["", _decision_stats([per[s] for s in seeds]), ""]
    lines.append(f"Result files: `{rel(results)}`.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/score_ablation.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "results" / "issue26")
    ap.add_argument("--suites", default="A,B,F")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    text = summarise(args.results, [s.strip() for s in args.suites.split(",")])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
