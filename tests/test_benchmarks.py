"""The benchmark harness (benchmarks/suites.py, suite_defs/, results_io.py, make_docs.py) on a tiny slice of suite B.

Runs the quick preset of suite B with two methods plus the replay control, one seed and a few hundred
MNIST-1D samples (seconds): result files are written atomically with their provenance, a re-run skips
them, and make_docs writes the tables and PNGs with "not run" entries for the rest.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

suites = pytest.importorskip("suites")
make_docs = pytest.importorskip("make_docs")
suite_defs = pytest.importorskip("suite_defs")
growth_cost = pytest.importorskip("growth_cost")

TINY = ["--set", "data.kwargs.num_samples=300", "--set", "train.epochs=2", "--set", "growth.at=[1]"]


def _argv(tmp: Path, methods: str) -> list[str]:
    return [
        "--suite",
        "B",
        "--preset",
        "quick",
        "--methods",
        methods,
        "--seeds",
        "0",
        "--results",
        str(tmp / "results"),
        "--runs",
        str(tmp / "runs"),
        *TINY,
    ]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    # the replay control comes first on the command line but runs after the firefly run it replays
    assert suites.main(_argv(tmp, "firefly-arch-from-scratch,random-matched,firefly,static-small")) == 0
    return tmp


def test_result_files_record_provenance(bench: Path) -> None:
    folder = bench / "results" / "B"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "firefly-arch-from-scratch-s0.json",
        "firefly-s0.json",
        "random-matched-s0.json",
        "static-small-s0.json",
    ]
    rec = json.loads((folder / "firefly-s0.json").read_text())
    assert rec["format"] == suites.FORMAT and rec["preset"] == "quick" and rec["seed"] == 0
    assert rec["command"].startswith("python benchmarks/suites.py --suite B")
    assert rec["config"]["growth"]["method"] == "firefly" and rec["config"]["data"]["kwargs"]["num_samples"] == 300
    assert rec["config"]["train"]["epochs"] == 2 and rec["config"]["growth"]["at"] == [1]
    assert [m["epoch"] for m in rec["metrics"]] == [1, 2]
    assert all(m["test_acc"] is not None and m["params"] > 0 and m["flops"] > 0 for m in rec["metrics"])
    assert len(rec["growths"]) == 1 and rec["growth_times_s"][0] > 0
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    assert rec["rounds"][1]["params"] > rec["rounds"][0]["params"]
    assert rec["final_architecture"]["growth_history"]
    assert rec["env"]["torch"] and rec["wall_time_s"] > 0 and rec["date"]
    assert rec["env"]["code"] is None or len(rec["env"]["code"].split("+")[0]) == 40  # the commit measured
    # the replay control: the firefly run's final architecture, never grown
    scratch = json.loads((folder / "firefly-arch-from-scratch-s0.json").read_text())
    assert scratch["config"]["model"]["name"] == "replayed-architecture"
    assert scratch["summary"]["params"] == rec["summary"]["params"]
    assert all(m["params"] == rec["summary"]["params"] for m in scratch["metrics"])
    # the matched-placement control: random units exactly where the firefly run grew, per group
    matched = json.loads((folder / "random-matched-s0.json").read_text())
    assert matched["config"]["growth"]["method"] == "random"
    placed = [{k: v for k, v in g["units_added"].items() if v} for g in matched["growths"]]
    chosen = [
        {k: g["units_added"].get(k, 0) + g["units_split"].get(k, 0) for k in {**g["units_added"], **g["units_split"]}}
        for g in rec["growths"]
    ]
    assert placed == [{k: v for k, v in c.items() if v} for c in chosen] and sum(placed[0].values()) > 0
    assert matched["summary"]["params"] > matched["rounds"][0]["params"]
    # anytime metrics: the growth record carries the numbers 1 epoch after it
    assert rec["growths"][0]["after_epochs"]["1"]["test_acc"] == rec["metrics"][1]["test_acc"]
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_rerun_skips_finished(bench: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in (bench / "results" / "B").iterdir()}
    assert suites.main(_argv(bench, "firefly,static-small")) == 0
    out = capsys.readouterr().out
    assert out.count("skip B/") == 2 and "0 run, 2 skipped, 0 failed" in out
    assert {p: p.stat().st_mtime_ns for p in (bench / "results" / "B").iterdir()} == before


def test_method_growth_overrides_reach_the_config() -> None:
    ablation = suites.build_config("A", "firefly-no-bn-calibration", 0, "quick")
    default = suites.build_config("A", "firefly", 0, "quick")
    assert ablation["growth"]["calibrate_new_bn"] is False and default["growth"]["calibrate_new_bn"] is None
    assert {k: v for k, v in ablation["growth"].items() if k != "calibrate_new_bn"} == {
        k: v for k, v in default["growth"].items() if k != "calibrate_new_bn"
    }


def test_ci95_is_students_t_interval() -> None:
    mean, lo, hi = make_docs.ci95([1.0, 2.0, 3.0, 4.0, 5.0])  # scipy.stats.t.interval(0.95, 4, 3, sem)
    assert mean == 3.0 and lo == pytest.approx(1.03676, abs=1e-3) and hi == pytest.approx(4.96324, abs=1e-3)
    assert make_docs.ci95([1.0]) is None


def test_paired_section_differences_by_seed() -> None:
    def rec(method: str, seed: int, acc: float, heldout: float) -> dict:
        growths = [
            {
                "epoch": 1,
                "heldout_loss_change": heldout,
                "after_epochs": {"1": {"test_acc": acc - 0.1}, "3": {"test_acc": acc}},
            }
        ]
        return {
            "method": method,
            "seed": seed,
            "summary": {"final_test_acc": acc, "params": 200},
            "growths": growths,
            "rounds": [{"params": 100}],
            "metrics": [],
        }

    ok = {
        "firefly": [rec("firefly", s, 0.5 + 0.01 * s + 0.02, -0.01) for s in range(3)],
        "random": [rec("random", s, 0.5 + 0.01 * s, 0.0) for s in range(3)],
    }
    text = "\n".join(make_docs._paired_section(suites.SUITES["B"], ok))
    # every seed +2 pt: the paired difference is exactly +2 with a zero-width interval
    assert "| `firefly` | `random` | 3 | +2.00 [+2.00, +2.00] | +2.00 [+2.00, +2.00] | +2.00 [+2.00, +2.00] |" in text
    assert "| 3/3 |" in text and "-0.0100" in text



def test_score_ablation_pairs_per_candidate_with_joint_by_seed(tmp_path: Path) -> None:
    """Issue 26's table: per-candidate − joint on the seeds both ran, with the decision statistics."""
    score_ablation = pytest.importorskip("score_ablation")

    def rec(method: str, seed: int, acc: float) -> dict:
        g = {"epoch": 1, "heldout_loss_change": -0.01, "test_loss_after": 1.0 - acc,
             "after_epochs": {"3": {"test_acc": acc, "test_loss": 1.0 - acc}}}
        if method != "firefly":
            g["extra"] = {"score_path": {"spearman_with_joint": 0.5, "kept_joint": 4, "kept_also_by_joint": 3}}
        return {"method": method, "seed": seed, "growths": [g], "metrics": [],
                "summary": {"final_test_acc": acc, "params": 100, "growth_time": 1.0}}
    (tmp_path / "B").mkdir()
    for seed in range(3):
        for method, acc in (("firefly", 0.5), ("firefly-per-candidate-score", 0.51)):
            (tmp_path / "B" / f"{method}-s{seed}.json").write_text(json.dumps(rec(method, seed, acc + 0.01 * seed)))
    (tmp_path / "B" / "firefly-s7.json").write_text(json.dumps(rec("firefly", 7, 0.5)))  # unpaired: left out
    text = score_ablation.summarise(tmp_path, ["A", "B"])
    assert "Suite A" in text and "_Not run._" in text
    assert "n = 3 paired seeds: 0, 1, 2" in text
    assert "| final test acc (pt) | 51.00 | 52.00 | +1.00 [+1.00, +1.00] | 3/3 |" in text
    assert "Spearman correlation of the two scores 0.50" in text and "75 % of the joint" in text

def test_matched_control_without_its_run_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert suites.main(_argv(tmp_path, "random-matched")) == 0
    assert "needs the finished firefly run" in capsys.readouterr().out


def test_replay_without_its_run_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert suites.main(_argv(tmp_path, "firefly-arch-from-scratch")) == 0
    assert "needs the finished firefly run" in capsys.readouterr().out
    assert not (tmp_path / "results" / "B").exists() or not list((tmp_path / "results" / "B").glob("*.json"))


def test_make_docs_tables_plots_and_not_run(bench: Path) -> None:
    out = bench / "docs" / "benchmarks.md"
    disc = bench / "discussion.md"
    disc.write_text("Our reading of the numbers.\n")
    text = make_docs.generate(bench / "results", "quick", out, bench / "docs" / "img", disc, ["B", "C"])
    assert out.read_text() == text
    assert "## Suite B" in text and "| `firefly` | 1 (0) |" in text
    assert "| `net2net` | 0 | not run |" in text  # missing methods are listed, never estimated
    assert "**Not run:**" in text and "`gradmax` (seeds 0)" in text
    assert "_Growth-time bar chart: not run (no results)._" in text  # suite C has no results here
    assert "Our reading of the numbers." in text
    assert (bench / "docs" / "img" / "suite-B-acc-vs-params.png").stat().st_size > 1000
    assert "](img/suite-B-acc-vs-params.png)" in text
    # without discussion.md the previous discussion is preserved
    text2 = make_docs.generate(bench / "results", "quick", out, bench / "docs" / "img", bench / "none.md", ["B"])
    assert "Our reading of the numbers." in text2


def test_suite_e_matches_budgets_and_reports_depth_decisions(tmp_path: Path, monkeypatch) -> None:
    """Suite E: every grower gets the same parameter budget; without CIFAR-10 it skips with a clear line;
    the report lists each round's inserted blocks and the depth share of the budget."""
    report = pytest.importorskip("suite_e_report")
    grow = [m for m in suites.SUITES["E"].methods.values() if m.kind == "grow"]
    assert {m.kwargs["budget"] for m in grow} == {suite_defs.e.BUDGET} == {"params:8000"}
    assert {m.kwargs.get("candidates") for m in grow if m.grower == "firefly"} == {"all", "width", "depth"}
    monkeypatch.delenv(suites.CIFAR10_ENV, raising=False)
    with pytest.raises(suites.SkipRun, match="--cifar10"):
        suites.build_config("E", "firefly-wd", 0, "full")
    cfg = suites.build_config("E-fmnist", "firefly-wd", 0, "full")
    assert cfg["model"]["name"] == "mobilenetv1-stages" and cfg["growth"]["kwargs"]["candidates"] == "all"
    block = {"after": "features.1", "type": "dwsep", "score": -0.01, "cost": 1000.0, "score_per_cost": -1e-5}
    rec = {
        "growths": [
            {
                "extra": {
                    "depth": {
                        "blocks": [{**block, "kept": True}],
                        "depth_share": 0.25,
                        "best_width_score_per_cost": -2e-5,
                    }
                }
            },
            {
                "extra": {
                    "depth": {
                        "blocks": [{**block, "kept": False}],
                        "depth_share": 0.0,
                        "best_width_score_per_cost": -3e-5,
                    }
                }
            },
        ]
    }
    rounds = report.depth_rounds(rec)
    assert [len(r["kept"]) for r in rounds] == [1, 0]
    assert [r["share"] for r in rounds] == [0.25, 0.0]


def test_suite_c_passes_its_methods_to_growth_cost_without_writing_its_globals(tmp_path: Path) -> None:
    """Suite C's methods (budget 0.35, seeded) reach growth_cost.py as arguments; its METHODS table is untouched."""
    before = {k: (g, dict(kw)) for k, (g, kw) in growth_cost.METHODS.items()}
    assert suites._cost_method("tiny", 3) == ("tiny", {"budget": 0.35, "holdout": 2, "seed": 3})
    assert suites._cost_method("firefly", 1) == ("firefly", {"budget": 0.35, "seed": 1})
    rec = suites.run_cost("random", 2, "quick", tmp_path, [], "cmd", memory=False)
    assert rec["config"]["grower_kwargs"] == {"budget": 0.35, "seed": 2} and rec["config"]["model"] == "vgg11"
    assert rec["cost"]["params_after"] > rec["cost"]["params_before"] > 0
    assert rec["rerun"].endswith("--methods random --seeds 2 --results " + str(tmp_path))
    assert growth_cost.METHODS == before and "tiny" not in growth_cost.METHODS


def test_budget_matched_peer_spends_the_parameters_its_source_spent_per_round(
    bench: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `budget_of` method gets, round by round, the parameters the same seed's source run added (growth.budgets),
    and is skipped with the command to run first when the source run is missing."""
    method = suite_defs.Method("random", {}, budget_of="firefly", note="test: random, budget-matched to firefly")
    monkeypatch.setitem(suites.SUITES["B"].methods, "random-budget", method)
    argv = _argv(bench, "random-budget")
    results = bench / "results"
    source = json.loads((results / "B" / "firefly-s0.json").read_text())
    spent = [g["params_after"] - g["params_before"] for g in source["growths"]]
    cfg = suites.build_config("B", "random-budget", 0, "quick", TINY[1::2], results)
    assert cfg["growth"]["budgets"] == [f"params:{n}" for n in spent]
    assert suites.main(argv) == 0
    peer = json.loads((results / "B" / "random-budget-s0.json").read_text())
    got = [g["params_after"] - g["params_before"] for g in peer["growths"]]
    assert len(got) == len(spent) == 1
    # the budget prices units at the current widths; units added to adjacent layers together add their cross terms
    assert 0.8 * spent[0] < got[0] < 1.2 * spent[0]
    elsewhere = [a if a != str(results) else str(bench / "elsewhere") for a in argv]
    assert suites.main(elsewhere) == 0
    assert "budget-matched to the finished firefly run" in capsys.readouterr().out


def test_training_flops_count_epochs_at_their_size_and_charge_growth_by_time() -> None:
    """3 x forward FLOPs x training samples per epoch; a growth step costs its time in epochs of the next epoch."""
    rec = {
        "config": {"data": {"train_subset": 1000, "val_fraction": 0.1}},
        "metrics": [
            {"flops": 10.0, "test_acc": 0.5, "epoch_time": 2.0},
            {"flops": 20.0, "test_acc": 0.6, "epoch_time": 4.0, "growth_time": 1.0},
        ],
    }
    first, second = 3 * 10 * 900, 3 * 20 * 900
    assert make_docs.training_flops(rec) == [(first, 0.5), (first + second * 1.25, 0.6)]
    assert make_docs.training_flops({**rec, "metrics": [{"test_acc": 0.5}]}) == []


def test_lm_growth_runs_every_method_on_a_tiny_corpus_and_tabulates(tmp_path: Path) -> None:
    """benchmarks/lm_growth.py (issue 23, item 6) on a generated corpus: each method grows to about its
    budget, the same validation windows score every run, a re-run skips finished files, the table pairs by
    seed and the plots are written."""
    pytest.importorskip("transformers")
    lm = pytest.importorskip("lm_growth")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    for f in range(2):
        texts = [" ".join(words[(i * 7 + j * 3 + f) % len(words)] for j in range(12)) for i in range(30)]
        (corpus / f"file{f}").write_text("\n%\n".join(texts) + "\n")
    (corpus / "file0.dat").write_bytes(b"\x00\x01")  # an index file: skipped
    out = tmp_path / "lm"
    argv = ["--preset", "smoke", "--seeds", "0", "1", "--corpus", str(corpus), "--out", str(out)]
    assert lm.main(argv) == 0
    recs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(recs) == {f"{m}-s{s}" for m in lm.METHODS for s in (0, 1)}
    for s in (0, 1):
        p0 = recs[f"static-small-s{s}"]["final_params"]
        assert recs[f"static-small-s{s}"]["growths"] == []
        for m in ("firefly", "firefly-silent", "firefly-in1", "random-matched", "random", "net2net", "stack"):
            r = recs[f"{m}-s{s}"]
            assert [g["step"] for g in r["growths"]] == lm.PRESETS["smoke"]["grow_at"]
            assert r["final_params"] > p0 and all(math.isfinite(row["val_bpc"]) for row in r["rows"])
            # growth keeps the function where the method promises it (random and Net2Net are exact)
            if m in ("firefly-silent", "random-matched", "random", "net2net"):
                for g in r["growths"]:
                    assert g["val_bpc_after"] == pytest.approx(g["val_bpc_before"], abs=1e-4)
        assert recs[f"static-final-s{s}"]["final_params"] > p0
        placed = [{**g["units_split"], **g["units_added"]} for g in recs[f"random-matched-s{s}"]["growths"]]
        assert placed == lm.placement_of(recs[f"firefly-s{s}"]["growths"])  # Firefly's groups and counts
        assert recs[f"firefly-silent-s{s}"]["final_params"] == recs[f"firefly-s{s}"]["final_params"]
    mtime = (out / "firefly-s0.json").stat().st_mtime_ns
    assert lm.main(argv) == 0 and (out / "firefly-s0.json").stat().st_mtime_ns == mtime  # skipped
    assert lm.main(["--table", "--out", str(out), "--img", str(tmp_path / "img")]) == 0
    summary = (out / "summary.md").read_text()
    assert "| random | 2 |" in summary and (tmp_path / "img" / "lm-growth-bpc-vs-flops.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="apt-get install fortunes"):
        lm.main(["--preset", "smoke", "--corpus", str(tmp_path / "missing"), "--out", str(out)])


def test_lm_growth_random_matched_follows_a_block_firefly_inserted() -> None:
    """When Firefly inserted a block in a step, matched random growth places its units and then a copy of
    that block (residual outputs zero) in the same place, so the next step's group names exist in it too."""
    pytest.importorskip("transformers")
    lm = pytest.importorskip("lm_growth")
    import torch

    model = lm.gpt2(20, 8, 16, 2, 2, 0)
    opt = torch.optim.AdamW(model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (4, 9), generator=gen)
    data = [(ids[:, :-1], ids[:, 1:])] * 6
    before = lm.val_bpc(model, data[:1])
    info = lm.grow("random-matched", model, opt, data, 1, 0, 10, {"transformer.h.0.mlp.c_fc": 3}, ["transformer.h.0"])
    assert info["layers_inserted"] == ["transformer.h.0"] and info["units_added"] == {"transformer.h.0.mlp.c_fc": 3}
    assert lm.val_bpc(model, data[:1]) == pytest.approx(before, abs=1e-5)  # function-preserving
    source, copy_ = model.transformer.h[0]
    assert source.mlp.c_fc.nf == copy_.mlp.c_fc.nf == 64 + 3  # the copy was made after the units were added
    groups = lm.analyze(model, (ids[:, :-1],)).groups
    assert {"transformer.h.0.0.mlp.c_fc", "transformer.h.0.1.mlp.c_fc"} <= set(groups)
