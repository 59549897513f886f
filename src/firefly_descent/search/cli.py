"""The `firefly search` subcommand (registered by `firefly_descent.cli` with two lines)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Add `search` to the `firefly` subcommands."""
    s = sub.add_parser("search", help="cell-based architecture search (firefly, darts, random) from a YAML config")
    s.add_argument("config", help="path to a search YAML config (sections: method, space, data, budget, eval, seeds)")
    s.add_argument("--out", type=Path, default=None, help="output directory (default runs/search-<name>); "
                   "rerunning into it continues an interrupted search")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a config value, e.g. --set budget.epochs=4; repeatable")
    s.add_argument("--progress", action="store_true", help="print a line per step")


def command(args: argparse.Namespace) -> int:
    """Run the search; print one line per seed."""
    from ..models.genotype import GenotypeError
    from ..train.config import ConfigError, load_raw
    from .runner import run_search

    try:
        out = args.out
        if out is None:
            out = Path("runs") / f"search-{load_raw(args.config).get('name', 'search')}"
        summary = run_search(args.config, out, tuple(args.overrides), progress=args.progress)
    except GenotypeError as e:
        raise ConfigError(str(e)) from None
    for r in summary["results"]:
        err = f"test error {r['test_error']:.2%}" if r["test_error"] is not None else "not evaluated"
        print(f"{r['method']} seed {r['seed']}: search {r['search_cpu_hours'] * 3600:.1f} CPU-s, "
              f"eval params {r['eval_params']}, {err}")
    print(f"wrote {out}")
    return 0
