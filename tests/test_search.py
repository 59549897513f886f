"""`firefly search`: Firefly / DARTS / random cell search end to end on tiny configs, resume, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from firefly_descent.cli import main
from firefly_descent.methods.cellsearch.darts_search import Darts, SearchNetwork
from firefly_descent.models.darts import DartsNetwork
from firefly_descent.models.genotype import Genotype
from firefly_descent.search import runner

TINY = {
    "name": "tiny",
    "space": {"C": 4, "layers": 3, "steps": 2},
    "data": {"name": "digits", "train_subset": 128, "test_subset": 64, "val_fraction": 0.5, "batch_size": 32,
             "augment": None},
    "budget": {"epochs": 2},
    "eval": {"epochs": 1, "C": 4, "layers": 3, "drop_path_prob": 0.1},
    "seeds": [0],
}
FIREFLY = {"name": "firefly", "kwargs": {"rounds": 1, "ops": ["skip_connect", "avg_pool_3x3", "sep_conv_3x3"],
                                         "max_edges": 2, "points": 2, "score_batches": 1, "step_one_batches": 2}}


def _write(tmp_path, method, **changes):
    cfg = {**TINY, "method": method, **changes}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_firefly_search_cli_end_to_end(tmp_path, capsys):
    cfg = _write(tmp_path, FIREFLY)
    out = tmp_path / "run"
    assert main(["search", str(cfg), "--out", str(out)]) == 0
    assert "firefly seed 0" in capsys.readouterr().out
    seed = out / "seed-0"
    for name in ("genotype.json", "normal.png", "reduce.png", "result.json", "checkpoint.pt", "log.jsonl",
                 "network.pt"):
        assert (seed / name).is_file(), name
    assert (seed / "normal.png").read_bytes()[:4] == b"\x89PNG"
    geno = Genotype.from_json((seed / "genotype.json").read_text())
    result = json.loads((seed / "result.json").read_text())
    assert Genotype.from_dict(result["genotype"]) == geno
    rows = [json.loads(line) for line in (seed / "log.jsonl").read_text().splitlines()]
    growth = [r["growth"] for r in rows if "growth" in r]
    assert len(growth) == 1 and growth[0]["params_after"] >= growth[0]["params_before"]
    # the grown cells are the genotype: started from one edge per node, grew the kept edges
    n_edges = len(geno.edges("normal")) + len(geno.edges("reduce"))
    assert n_edges == 4 + len([k for k in growth[0]["kept"] if "->" in k])  # new edges; new cells/widths aside
    assert result["search_cpu_hours"] > 0 and 0.0 <= result["test_error"] <= 1.0
    assert result["eval_params"] == sum(
        p.numel() for n, p in DartsNetwork(geno, 4, 3, 10, 1, 8, auxiliary=True).named_parameters()
        if "auxiliary" not in n
    )
    # the trained grown network comes with the genotype, rebuilt from its constructor and growth history
    import firefly_descent as ff

    extra = torch.load(seed / "network.pt", weights_only=True)["extra"]
    net = ff.load(str(seed / "network.pt"), build=lambda: DartsNetwork(**extra["build"]))
    assert net.genotype() == Genotype.from_dict(extra["genotype"])
    assert Genotype.from_dict(extra["genotype"]).edges("reduce") == geno.edges("reduce")
    # rerunning into a finished folder does nothing new; another config is refused with one line
    assert main(["search", str(cfg), "--out", str(out)]) == 0
    assert main(["search", str(cfg), "--out", str(out), "--set", "budget.epochs=3"]) == 2
    assert "holds a different search" in capsys.readouterr().err


def test_random_search_resumes_to_the_same_result(tmp_path, monkeypatch):
    method = {"name": "random", "kwargs": {"trials": 2}}
    cfg = {**TINY, "method": method, "eval": {"epochs": 0}}
    straight = runner.run_search(cfg, tmp_path / "a")["results"][0]

    calls = {"n": 0}
    real = runner.RandomSearch.step

    def dying(self, i):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, i)

    monkeypatch.setattr(runner.RandomSearch, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run_search(cfg, tmp_path / "b")
    assert (tmp_path / "b" / "seed-0" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "seed-0" / "result.json").exists()
    monkeypatch.setattr(runner.RandomSearch, "step", real)
    resumed = runner.run_search(cfg, tmp_path / "b")["results"][0]
    assert resumed["genotype"] == straight["genotype"]
    log_a = [json.loads(x) for x in (tmp_path / "a" / "seed-0" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "seed-0" / "log.jsonl").read_text().splitlines()]
    assert [r["val_acc"] for r in log_a] == [r["val_acc"] for r in log_b]


def test_darts_search_first_and_second_order_discretise_top2():
    torch.manual_seed(0)
    net = SearchNetwork(C=2, layers=3, num_classes=3, in_channels=1, steps=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    for order in (1, 2):
        darts = Darts(net, lr=0.05, arch_lr=0.05, order=order)
        before = [a.detach().clone() for a in net.arch_parameters()]
        darts.epoch(batches, list(reversed(batches)), lr=0.05)
        assert any(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before))
    g = net.genotype()
    for kind in ("normal", "reduce"):
        edges = g.edges(kind)
        assert [i for _, _, i in edges] == [2, 2, 3, 3]  # two edges per node: the DARTS layout
        assert all(op != "none" for op, _, _ in edges)
        assert len({(j, i) for _, j, i in edges}) == 4  # distinct inputs per node
    # the discretisation keeps the strongest edges: make one edge of node 3 dominate with skip_connect
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[4, 3] = 10.0  # node 3 (edges 2..4), input 2, skip_connect
    assert ("skip_connect", 2, 3) in net.genotype().edges("normal")
    model = DartsNetwork(g, 2, 3, 3, 1, 8)
    assert F.cross_entropy(model(x), y).isfinite()


def test_search_config_refusals(tmp_path, capsys):
    cfg = _write(tmp_path, {"name": "firefly", "kwargs": {"budjet": 1}})
    assert main(["search", str(cfg), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "method.kwargs: unknown option(s) budjet" in err and err.count("\n") <= 3
    cfg = _write(tmp_path, {"name": "dartz"})
    assert main(["search", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "method.name" in capsys.readouterr().err
    cfg = _write(tmp_path, FIREFLY, data={**TINY["data"], "val_fraction": 0.0})
    assert main(["search", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "val_fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_firefly_search_resumes_after_growth_to_the_same_result(tmp_path, monkeypatch):
    cfg = {**TINY, "method": FIREFLY}
    straight = runner.run_search(cfg, tmp_path / "a")["results"][0]
    real = runner.FireflySearch.step

    def dying(self, i):
        if i == 1:  # after the growth round of step 0 was checkpointed
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(runner.FireflySearch, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run_search(cfg, tmp_path / "b")
    monkeypatch.setattr(runner.FireflySearch, "step", real)
    resumed = runner.run_search(cfg, tmp_path / "b")["results"][0]
    assert resumed["genotype"] == straight["genotype"]
    assert resumed["test_acc"] == straight["test_acc"]
    log = [(tmp_path / d / "seed-0" / "log.jsonl").read_text().splitlines() for d in "ab"]
    rows = [[json.loads(x) for x in lines] for lines in log]
    assert [r.get("train_loss") for r in rows[0]] == [r.get("train_loss") for r in rows[1]]


def test_firefly_train_accepts_darts_eval(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(Genotype.from_edges([("sep_conv_3x3", 1, 2), ("skip_connect", 0, 2)],
                                        [("max_pool_3x3", 0, 2), ("avg_pool_3x3", 1, 2)]).to_json())
    cfg = {
        "data": {"name": "digits", "train_subset": 128, "test_subset": 64, "batch_size": 64},
        "model": {"name": "darts-eval", "kwargs": {"genotype": str(path), "C": 2, "layers": 3}},
        "growth": {"method": "static"},
        "train": {"epochs": 1, "tensorboard": False},
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_loss"] > 0 and row["test_acc"] is not None
