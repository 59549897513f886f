"""Hashes of what a refactor must not change: growth decisions, per-epoch metrics, final architecture.

Wall-clock fields are removed before hashing. Used for issue 22 (the house refactor): the same runs with the code
before and after, then the printed hashes compared (benchmarks/results/issue22_equivalence.txt)::

    python benchmarks/suites.py --suite B --preset full --methods firefly,random --seeds 0 \\
        --results OUT/results --runs OUT/runs
    python benchmarks/default_run.py --runs OUT/runs/default --out OUT/default-run --without-static --threads 1
    python benchmarks/suites.py --suite A --preset full --methods firefly --seeds 0 --results OUT/results \\
        --runs OUT/runs
    python benchmarks/suites.py --suite F --preset full --methods firefly --seeds 0 --cifar10 CIFAR \\
        --results OUT/results --runs OUT/runs
    python benchmarks/behaviour_hashes.py OUT
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

# keys whose values are wall-clock times, dates, paths or machine facts
TIME_KEYS = ("time", "seconds", "elapsed", "wall", "date", "started", "_s", "run_dir", "path", "out",
             "throughput", "samples_per", "env", "command", "memory", "peak")
# what a growth step decided and measured
DECISION_KEYS = ("units_split", "units_added", "layers_inserted", "widths_before", "widths_after", "params_before",
                 "params_after", "flops_before", "flops_after", "loss_before", "loss_after", "predicted_loss_change")
SAFETY_KEYS = ("outcome", "amplitude", "heldout_before", "heldout_after")


def clean(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: clean(v) for k, v in sorted(o.items()) if not any(t in k.lower() for t in TIME_KEYS)}
    if isinstance(o, list):
        return [clean(v) for v in o]
    if isinstance(o, float):
        return repr(o)
    return o


def digest(o: Any) -> str:
    return hashlib.sha256(json.dumps(clean(o), sort_keys=True).encode()).hexdigest()[:16]


def decisions(growths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in growths:
        safety = g.get("safety") or {}
        out.append({k: g.get(k) for k in DECISION_KEYS} | {"safety": {k: safety.get(k) for k in SAFETY_KEYS}})
    return out


def main(root: Path) -> None:
    for f in sorted((root / "results").rglob("*.json")):
        d = json.loads(f.read_text())
        print(f.relative_to(root), "decisions", digest(decisions(d["growths"])), "metrics", digest(d["metrics"]),
              "growths", digest(d["growths"]), "arch", digest(d.get("final_architecture")),
              "acc", d["summary"]["final_test_acc"], "params", d["summary"]["params"])
    run = root / "runs" / "default" / "default"
    if run.is_dir():
        m = [json.loads(line) for line in open(run / "metrics.jsonl")]
        g = [json.loads(line) for line in open(run / "growth.jsonl")]
        print("default-run metrics", digest(m), "growths", digest(g), "acc", m[-1].get("test_acc"),
              "params", m[-1].get("params"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
