"""Run a cell search from a config: one search per seed, each resumable step by step.

    out/search.yaml                  the resolved config (a rerun with another config into `out` is refused)
    out/seed-<s>/checkpoint.pt       atomic; written after every step (an epoch, a growth round, a trial)
    out/seed-<s>/log.jsonl           one line per step
    out/seed-<s>/genotype.json       the found genotype (DARTS field names), normal.png, reduce.png
    out/seed-<s>/network.pt          Firefly: the trained grown network (`ff.load` with extra["build"])
    out/seed-<s>/result.json         search cost (process CPU seconds, wall seconds), params, evaluation
    out/summary.json                 all seeds

Every method spends `budget.epochs` passes over the training split at search size (DARTS also reads the
validation split for its architecture steps). Every genotype is evaluated by the same protocol: the
`eval` section's network trained from scratch on the training + validation splits, tested on the test split.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from ..data import load_dataset
from ..engine import growth_history, replay_history, save
from ..io import atomic_save, atomic_write_text
from ..methods.cellsearch import FireflyCells, minimal_genotype, random_genotype
from ..methods.cellsearch.darts_search import Darts, SearchNetwork
from ..models.darts import DartsNetwork, count_parameters
from ..models.genotype import Genotype
from ..train.config import ConfigError
from ..train.threads import busy_notice
from .config import SearchConfig, load_search_config, search_config_to_dict
from .draw import draw_cell


def _cosine(base: float, floor: float, epoch: int, total: int) -> float:
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * epoch / max(total, 1)))


def _loader(ds: Any, batch: int, seed: int, epoch: int, stream: int, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(seed * 7919 + epoch * 31 + stream)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g if shuffle else None)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy in eval mode."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}


def train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, lr: float, device: torch.device,
                grad_clip: float = 5.0) -> dict[str, float]:
    """One SGD pass; adds the auxiliary loss of a DartsNetwork that has an auxiliary head."""
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    total, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        aux = model.auxiliary_loss(y, F.cross_entropy) if isinstance(model, DartsNetwork) else None
        (loss if aux is None else loss + aux).backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        total += float(loss.detach()) * len(y)
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return {"train_loss": total / max(n, 1), "train_acc": correct / max(n, 1)}


class _Context:
    """What every method needs: config, seed, data, device."""

    def __init__(self, cfg: SearchConfig, seed: int, bundle: Any, device: torch.device) -> None:
        self.cfg, self.seed, self.bundle, self.device = cfg, seed, bundle, device
        self.in_channels = int(bundle.input_shape[0])
        self.input_size = int(bundle.input_shape[-1])
        self.num_classes = int(bundle.num_classes)

    def network(self, genotype: Genotype, C: int | None = None, layers: int | None = None, **kw: Any) -> DartsNetwork:
        s = self.cfg.space
        return DartsNetwork(genotype, C or s.C, layers or s.layers, self.num_classes, self.in_channels,
                            self.input_size, stem_multiplier=s.stem_multiplier, **kw).to(self.device)

    def sgd(self, model: nn.Module, eval_: bool = False) -> torch.optim.Optimizer:
        o = self.cfg.eval if eval_ else self.cfg.optim
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    def lr(self, epoch: int, total: int, eval_: bool = False) -> float:
        o = self.cfg.eval if eval_ else self.cfg.optim
        return _cosine(o.lr, o.min_lr, epoch, total)

    def train_loader(self, epoch: int, stream: int = 0) -> DataLoader:
        return _loader(self.bundle.train, self.cfg.data.batch_size, self.seed, epoch, stream)


class FireflySearch:
    """Grow from a minimal cell: train, grow (Firefly over new edges), ... train; the cells are the genotype."""

    def __init__(self, ctx: _Context) -> None:
        kw = dict(ctx.cfg.method.kwargs)
        self.ctx, self.epochs = ctx, ctx.cfg.budget.epochs
        rounds = int(kw.pop("rounds", 3))
        self.grow_after = sorted({round((r + 1) * self.epochs / (rounds + 1)) for r in range(rounds)})
        self.init = minimal_genotype(ctx.cfg.space.steps, kw.pop("init_op", "sep_conv_3x3"))
        if "ops" in kw:
            kw["ops"] = tuple(kw["ops"])
        if "kinds" in kw:
            kw["kinds"] = tuple([kw["kinds"]] if isinstance(kw["kinds"], str) else kw["kinds"])
        self.grower = FireflyCells(**kw)
        self.model = ctx.network(self.init)
        self.opt = ctx.sgd(self.model)
        self.reports: list[dict[str, Any]] = []

    @property
    def steps(self) -> int:
        return self.epochs

    def step(self, i: int) -> dict[str, Any]:
        ctx = self.ctx
        row = train_epoch(self.model, ctx.train_loader(i), self.opt, ctx.lr(i, self.epochs), ctx.device,
                          ctx.cfg.optim.grad_clip)
        if i + 1 in self.grow_after:
            report = self.grower.grow(self.model, ctx.train_loader(i, stream=1), F.cross_entropy)
            self.opt = ctx.sgd(self.model)  # fresh momentum after growth, as the paper's code
            self.reports.append(report.to_dict())
            row["growth"] = {k: v for k, v in report.to_dict().items() if k != "scores"}
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"history": growth_history(self.model), "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "reports": self.reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model = self.ctx.network(self.init)
        replay_history(self.model, list(state["history"]))
        self.model.load_state_dict(state["model"])
        self.model.to(self.ctx.device)
        self.opt = self.ctx.sgd(self.model)
        self.opt.load_state_dict(state["opt"])
        self.reports = list(state["reports"])

    def genotype(self) -> Genotype:
        return self.model.genotype()

    def save_network(self, path: Path) -> None:
        """The trained grown network: `ff.load(path, build=lambda: DartsNetwork(**extra["build"]))`."""
        s, c = self.ctx.cfg.space, self.ctx
        build = {"genotype": self.init.to_dict(), "C": s.C, "layers": s.layers, "num_classes": c.num_classes,
                 "in_channels": c.in_channels, "input_size": c.input_size, "stem_multiplier": s.stem_multiplier}
        save(self.model, str(path), extra={"build": build, "genotype": self.genotype().to_dict()})

    def search_params(self) -> int:
        return count_parameters(self.model)


class DartsSearch:
    """DARTS at search size: the mixed-operation network trained by bilevel alternation."""

    def __init__(self, ctx: _Context) -> None:
        kw = ctx.cfg.method.kwargs
        s, o = ctx.cfg.space, ctx.cfg.optim
        self.ctx, self.epochs = ctx, ctx.cfg.budget.epochs
        self.net = SearchNetwork(s.C, s.layers, ctx.num_classes, ctx.in_channels, s.steps, s.stem_multiplier)
        self.net.to(ctx.device)
        self.darts = Darts(self.net, o.lr, o.momentum, o.weight_decay, float(kw.get("arch_lr", 3e-4)),
                           float(kw.get("arch_weight_decay", 1e-3)), o.grad_clip, int(kw.get("order", 1)))

    @property
    def steps(self) -> int:
        return self.epochs

    def step(self, i: int) -> dict[str, Any]:
        ctx = self.ctx
        val = _loader(ctx.bundle.val, ctx.cfg.data.batch_size, ctx.seed, i, 2)
        row = self.darts.epoch(ctx.train_loader(i), val, ctx.lr(i, self.epochs))
        row["genotype"] = self.genotype().to_dict()
        return row

    def state_dict(self) -> dict[str, Any]:
        return self.darts.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.darts.load_state_dict(state)

    def genotype(self) -> Genotype:
        return self.net.genotype()

    def search_params(self) -> int:
        return sum(p.numel() for p in self.net.weight_parameters())


class RandomSearch:
    """Random genotypes, each trained at search size for budget.epochs / trials epochs; best on validation."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.trials = int(ctx.cfg.method.kwargs.get("trials", 4))
        self.per_trial = ctx.cfg.budget.epochs // self.trials
        self.results: list[dict[str, Any]] = []

    @property
    def steps(self) -> int:
        return self.trials

    def step(self, i: int) -> dict[str, Any]:
        ctx = self.ctx
        geno = random_genotype(random.Random(ctx.seed * 1009 + i), ctx.cfg.space.steps)
        torch.manual_seed(ctx.seed * 1009 + i)
        model = ctx.network(geno)
        opt = ctx.sgd(model)
        for e in range(self.per_trial):
            train_epoch(model, ctx.train_loader(i * 1000 + e), opt, ctx.lr(e, self.per_trial), ctx.device,
                        ctx.cfg.optim.grad_clip)
        val = evaluate(model, _loader(ctx.bundle.val, ctx.cfg.data.batch_size, 0, 0, 0, False), ctx.device)
        row = {"trial": i, "genotype": geno.to_dict(), "val_acc": val["acc"], "val_loss": val["loss"],
               "params": count_parameters(model)}
        self.results.append(row)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"results": json.dumps(self.results)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.results = json.loads(state["results"])

    def genotype(self) -> Genotype:
        best = max(self.results, key=lambda r: (r["val_acc"], -r["val_loss"]))
        return Genotype.from_dict(best["genotype"])

    def search_params(self) -> int:
        return max(self.results, key=lambda r: (r["val_acc"], -r["val_loss"]))["params"]


METHODS = {"firefly": FireflySearch, "darts": DartsSearch, "random": RandomSearch}


class Evaluation:
    """The shared evaluation protocol: train the genotype's eval network from scratch, test it."""

    def __init__(self, ctx: _Context, genotype: Genotype) -> None:
        e = ctx.cfg.eval
        self.ctx, self.epochs = ctx, e.epochs
        torch.manual_seed(ctx.seed + 12345)
        self.model = ctx.network(genotype, e.C, e.layers, auxiliary=e.auxiliary, auxiliary_weight=e.auxiliary_weight)
        self.opt = ctx.sgd(self.model, eval_=True)
        b = ctx.bundle
        self.data = ConcatDataset([b.train, b.val]) if b.val is not None else b.train

    def step(self, i: int) -> dict[str, Any]:
        ctx, e = self.ctx, self.ctx.cfg.eval
        self.model.drop_path_prob = e.drop_path_prob * i / max(self.epochs, 1)
        loader = _loader(self.data, e.batch_size or ctx.cfg.data.batch_size, ctx.seed, i, 3)
        return train_epoch(self.model, loader, self.opt, ctx.lr(i, self.epochs, True), ctx.device, e.grad_clip)

    def test(self) -> dict[str, float]:
        b = self.ctx.bundle
        return evaluate(self.model, _loader(b.test, self.ctx.cfg.data.batch_size, 0, 0, 0, False), self.ctx.device)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def run_seed(cfg: SearchConfig, seed: int, folder: Path, progress: bool = False) -> dict[str, Any]:
    """Search (or continue searching) with one seed, then evaluate; returns the seed's result."""
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    d = cfg.data
    bundle = load_dataset(d.name, d.root, val_fraction=d.val_fraction, seed=seed, train_subset=d.train_subset,
                          test_subset=d.test_subset, augment=d.augment, **d.kwargs)
    device = _device(cfg.device)
    ctx = _Context(cfg, seed, bundle, device)
    torch.manual_seed(seed)
    method = METHODS[cfg.method.name](ctx)
    ckpt_path, log = folder / "checkpoint.pt", folder / "log.jsonl"
    state: dict[str, Any] = {"phase": "search", "step": 0, "cpu_s": 0.0, "wall_s": 0.0, "eval_cpu_s": 0.0,
                             "genotype": None}
    evaluation: Evaluation | None = None
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        state = ck["state"]
        method.load_state_dict(ck["method"])
        if state["phase"] == "eval":
            evaluation = Evaluation(ctx, Genotype.from_json(state["genotype"]))
            evaluation.load_state_dict(ck["eval"])
        torch.set_rng_state(ck["rng"])
    elif log.exists():
        log.unlink()

    def save() -> None:
        atomic_save({"state": state, "method": method.state_dict(), "rng": torch.get_rng_state(),
                     "eval": evaluation.state_dict() if evaluation is not None else None}, ckpt_path)

    while state["phase"] == "search" and state["step"] < method.steps:
        c0, w0 = time.process_time(), time.perf_counter()
        row = method.step(state["step"])
        state["cpu_s"] += time.process_time() - c0
        state["wall_s"] += time.perf_counter() - w0
        state["step"] += 1
        _append(log, {"phase": "search", "step": state["step"], **row})
        if progress:
            print(f"seed {seed} {cfg.method.name} step {state['step']}/{method.steps}", flush=True)
        save()
    if state["phase"] == "search":
        geno = method.genotype()
        geno.meta = {"method": cfg.method.name, "seed": seed}
        state["genotype"] = geno.to_json()
        state["search_params"] = method.search_params()
        state["phase"], state["step"] = "eval", 0
        if hasattr(method, "save_network"):
            method.save_network(folder / "network.pt")
        evaluation = Evaluation(ctx, geno) if cfg.eval.epochs > 0 else None
        save()
    geno = Genotype.from_json(state["genotype"])
    atomic_write_text(folder / "genotype.json", geno.to_json())
    for kind in ("normal", "reduce"):
        draw_cell(geno, kind, folder / f"{kind}.png")
    test = None
    if evaluation is not None:
        while state["step"] < evaluation.epochs:
            c0 = time.process_time()
            row = evaluation.step(state["step"])
            state["eval_cpu_s"] += time.process_time() - c0
            state["step"] += 1
            _append(log, {"phase": "eval", "step": state["step"], **row})
            save()
        test = evaluation.test()
    result = {
        "method": cfg.method.name,
        "seed": seed,
        "genotype": geno.to_dict(),
        "search_cpu_hours": state["cpu_s"] / 3600.0,
        "search_wall_hours": state["wall_s"] / 3600.0,
        "search_params": state.get("search_params"),
        "eval_params": count_parameters(evaluation.model) if evaluation is not None else None,
        "eval_epochs": cfg.eval.epochs,
        "eval_cpu_hours": state["eval_cpu_s"] / 3600.0,
        "test_acc": test["acc"] if test else None,
        "test_error": (1.0 - test["acc"]) if test else None,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return result


def run_search(source: Any, out_dir: str | Path, overrides: tuple[str, ...] = (), progress: bool = False
               ) -> dict[str, Any]:
    """Run (or continue) the search of a config into `out_dir`, every seed; returns the summary."""
    cfg = load_search_config(source, overrides)
    out = Path(out_dir)
    resolved = yaml.safe_dump(search_config_to_dict(cfg), sort_keys=True)
    saved = out / "search.yaml"
    if saved.exists():
        if saved.read_text() != resolved:
            raise ConfigError(f"{out} holds a different search (its search.yaml differs); choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, resolved)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    on_cpu = _device(cfg.device).type == "cpu"
    notice = busy_notice(torch.get_num_threads(), cfg.threads, "threads") if on_cpu else None  # as `firefly train`
    if notice:
        print(notice, file=sys.stderr, flush=True)
    results = [run_seed(cfg, s, out / f"seed-{s}", progress) for s in cfg.seeds]
    summary = {"name": cfg.name, "method": cfg.method.name, "results": results}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
