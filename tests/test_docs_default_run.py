"""docs/default-run/ holds numbers from a real run: its `run-summary.json` has exactly the format of a
fresh run's `summary.json`, and the report and README there quote it (regenerate with
`python benchmarks/default_run.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from firefly_descent.train import train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "default-run"


def _shape(summary: dict) -> dict[str, str]:
    return {k: "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
            for k, v in summary.items()}


def test_committed_summary_has_a_fresh_runs_format_and_is_quoted(tmp_path):
    committed = json.loads((DOCS / "run-summary.json").read_text())
    cfg = {
        "name": "fmt",
        "data": {"name": "digits", "batch_size": 128},
        "model": {"name": "mlp", "kwargs": {"hidden": [4]}},
        "growth": {"method": "static"},
        "train": {"epochs": 1},
    }
    fresh = train(cfg, tmp_path / "run", progress=False)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == {k: v for k, v in fresh.items()}
    assert _shape(committed) == _shape(on_disk)
    assert isinstance(committed["params"], int) and 0 < committed["final_test_acc"] < 1
    assert committed["num_growths"] == 3 and committed["epochs"] == 8
    acc, params = f"{100 * committed['final_test_acc']:.2f}%", f"{committed['params']:,}"
    row = next(line for line in (DOCS / "report.md").read_text().splitlines() if line.startswith("| default |"))
    assert f"| {acc} |" in row and f"| {params} |" in row
    readme = (DOCS / "README.md").read_text()
    assert "python benchmarks/default_run.py" in readme and row in readme
    assert f"{committed['final_test_acc']:.2%}" in readme and params in readme
    for png in ("curves.png", "acc_vs_params.png", "widths.png"):
        assert (DOCS / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
