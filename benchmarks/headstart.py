"""Does growth's head start survive the next epoch? (issue 26, item 1)

One growth, then one more epoch, Firefly against random growth with paired seeds, on two settings:

- ``resnet``: our ResNet-18 at width 8 on a 4,000-image Fashion-MNIST slice, the `fashion-vgg-*` presets'
  optimizer (SGD, Nesterov, lr 0.05, ×0.1 at half of each phase, LR restart at growth), 2 epochs, growth
  (budget 0.35) after epoch 2, 1 more epoch; ``schedule.step_per_batch`` off, as the issue measured it (the presets
  now turn it on), unless a variant sets it;
- ``mlp``: suite B's full preset (MLP [16, 16] on MNIST-1D, Adam 3e-3, cosine over 60 epochs), growth after
  epoch 12, 1 more epoch.

Each run goes through the library's own training pieces (`train.setup.prepare`, `Run`, `train_epoch`,
`growth_step.grow`) and records the test loss/accuracy before growth, right after it, every quarter of the next
epoch, and after it; plus probes that answer one candidate cause each without changing the run (RNG state and
BatchNorm buffers are restored around them): the test loss after re-estimating BatchNorm statistics on the whole
training set, the loss increase under a small random weight perturbation, and the top Hessian eigenvalue of one
training batch (power iteration). A *variant* changes one thing (see VARIANTS). Resumable: one JSON per run under
benchmarks/results/headstart/; ``--table`` prints the paired comparison.

    python benchmarks/headstart.py --setting resnet --variants base step-per-batch --seeds 0 1 2 --probes light
    python benchmarks/headstart.py --setting mlp --variants base opt-reset gentle --seeds 0 1 2
    python benchmarks/headstart.py --table --pair firefly/step-per-batch random/step-per-batch
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from make_docs import ci95  # noqa: E402  (the paired 95 % t-interval the suite reports use)
from results_io import atomic_write_json, environment, read_json  # noqa: E402

from firefly_descent.engine import refresh_batchnorm  # noqa: E402
from firefly_descent.train import load_config  # noqa: E402
from firefly_descent.train.epochs import train_epoch  # noqa: E402
from firefly_descent.train.growth_step import grow  # noqa: E402
from firefly_descent.train.rundir import RunDir  # noqa: E402
from firefly_descent.train.setup import prepare  # noqa: E402
from firefly_descent.train.state import Run  # noqa: E402

RESULTS = HERE / "results" / "headstart"

# one change at a time; "grower" entries go to Firefly only (random growth has no such knob)
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "opt-reset": {"opt": "reset-grown", "note": "optimizer state of every resized tensor dropped after growth"},
    "no-restart": {"lr": "continue", "note": "the epoch after growth keeps the pre-growth LR (no restart)"},
    "warmup": {
        "set": ["schedule.warmup_after_growth=0.5"],
        "note": "the library's warm-up: after growth the LR ramps linearly from the pre-growth LR to the restart LR "
        "over half an epoch",
    },
    "step-per-batch": {
        "set": ["schedule.step_per_batch=true"],
        "note": "the step milestone acts within the epoch: the one-epoch phase after growth decays at its middle",
    },
    "gentle": {"grower": {"split_radius": 0.25, "new_out_radius": 0.25}, "note": "Firefly radii halved"},
    "in1": {
        "grower": {"init_new_in": 1.0},
        "note": "new units' incoming rows drawn at the existing units' RMS (init_new_in 1.0, default 0.5): the cause "
        "of Firefly's loss on the language-model benchmark",
    },
    "step-per-batch-in1": {
        "set": ["schedule.step_per_batch=true"],
        "grower": {"init_new_in": 1.0},
        "note": "step-per-batch with init_new_in 1.0",
    },
}


def settings(setting: str, method: str, seed: int, variant: dict[str, Any]) -> tuple[Any, int]:
    """The config of one run and the epoch after which it grows."""
    grower = {"budget": 0.35, "seed": seed}
    if method == "firefly":
        grower.update(variant.get("grower", {}))
    if setting == "resnet":
        cfg = load_config(
            "fashion-vgg-firefly",
            [
                "model.name=resnet18",
                "model.kwargs={width: 8}",
                "data.train_subset=4000",
                "train.epochs=3",
                "growth.at=[2]",
                f"growth.method={method}",
                f"train.seed={seed}",
                "train.threads=1",
                f"growth.kwargs={grower}",
                "schedule.step_per_batch=false",  # the loop as the issue measured it; a variant may set it
                *variant.get("set", []),
            ],
        )
        return cfg, 2
    import suites  # noqa: PLC0415  (benchmarks/suites.py: suite B's config, only for this setting)

    raw = suites.build_config("B", method, seed, "full", ["growth.at=[12]"], threads=1)
    raw["growth"]["kwargs"] = grower
    return load_config(raw, list(variant.get("set", []))), 12


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run a probe without changing the run: RNG states, BatchNorm buffers, parameters and the mode restored."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mode = model.training
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(saved[k])
            model.train(mode)


def probe_batches(run: Run, n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `n` training examples in order (no augmentation drawn from the run's generators)."""
    ds = run.s.bundle.train
    items = ds.__getitems__(list(range(min(n, len(ds)))))
    x = torch.stack([a for a, _ in items])
    y = torch.stack([torch.as_tensor(b) for _, b in items])
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def eval_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: Any) -> float:
    model.eval()
    with torch.no_grad():
        tot = sum(float(loss_fn(model(x), y)) * len(y) for x, y in batches)
    return tot / sum(len(y) for _, y in batches)


def sharpness(run: Run, seed: int, hessian: bool = True) -> dict[str, float]:
    """Two sharpness proxies of the current point: the mean eval-mode loss increase on 512 training examples
    under 3 random perturbations of every tensor by 5 % of its RMS, and the top Hessian eigenvalue of the
    train-mode loss of one 128-example batch (12 power iterations)."""
    model, loss_fn = run.model, run.loss_fn
    batches = probe_batches(run, 512, 128)
    out: dict[str, float] = {}
    with untouched(model):
        gen = torch.Generator().manual_seed(1000 + seed)
        base = eval_loss(model, batches, loss_fn)
        rises = []
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(3):
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:
                    rms = float(p.pow(2).mean().sqrt())
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05 * rms)
            rises.append(eval_loss(model, batches, loss_fn) - base)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        out["perturbed_rise"] = statistics.fmean(rises)
        if not hessian:
            return out
        model.train()
        x, y = batches[0]
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn(p.shape, generator=gen) for p in params]
        lam = 0.0
        for _ in range(12):
            norm = math.sqrt(sum(float((t * t).sum()) for t in v))
            v = [t / norm for t in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            lam = sum(float((a * b).sum()) for a, b in zip(hv, v))
            v = [t.detach() for t in hv]
        out["hessian_top"] = lam
    return out


def test_with_fresh_bn(run: Run) -> dict[str, Any]:
    """Test loss/acc after re-estimating BatchNorm statistics on the whole training set (probe; restored)."""
    with untouched(run.model):
        if not refresh_batchnorm(run.model, [x for x, _ in probe_batches(run, 10**9, 500)]):
            return {"loss": None, "acc": None}
        return run.rt.evaluate(run.model, run.s.test_loader, run.device, run.s.task, run.amp)


class QuarterLoader:
    """The training loader, evaluating the test set before the batches that start each quarter of the epoch
    (the model has trained on the quarters before) and averaging the training loss per quarter."""

    def __init__(self, run: Run, record: list[dict[str, Any]]) -> None:
        self.run, self.inner, self.record = run, run.s.train_loader, record

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        nb = len(self.inner)
        marks = {round(nb * q / 4): q for q in (1, 2, 3)}
        for b, batch in enumerate(self.inner):
            if b in marks:
                run = self.run
                test = run.rt.evaluate(run.model, run.s.test_loader, run.device, run.s.task, run.amp)
                run.model.train()
                lr = run.optimizer.param_groups[0]["lr"]
                self.record.append({"quarter": marks[b], "batch": b, **_lossacc(test), "lr": lr})
            yield batch


def _lossacc(d: dict[str, Any]) -> dict[str, Any]:
    return {"test_loss": d["loss"], "test_acc": d["acc"]}


class FixedLR:
    """The schedule of the epoch after growth when a variant overrides it: a constant rate."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def lr_at(self, epoch: int, batch: int = 0, batches_per_epoch: int = 1) -> float:
        return self.lr

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, batch: int = 0, batches_per_epoch: int = 1) -> float:
        for g in optimizer.param_groups:
            g["lr"] = self.lr
        return self.lr


def one_run(setting: str, method: str, variant_name: str, seed: int, probes: str = "full") -> dict[str, Any]:
    """Train to the growth epoch, grow once, train one more epoch; every measurement in one dict.
    ``probes="light"`` keeps only the fresh-BatchNorm test after the epoch and the perturbation probe after growth
    (the Hessian probes cost as much as an epoch on the ResNet)."""
    full = probes == "full"
    variant = VARIANTS[variant_name]
    t0 = time.perf_counter()
    cfg, at = settings(setting, method, seed, variant)
    torch.set_num_threads(1)
    setup = prepare(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        files = RunDir(Path(tmp) / "run")
        files.create(setup.cfg)
        run = Run(setup, Path(tmp) / "run", progress=False)
        ev = run.rt.evaluate
        for _ in range(at):
            train_epoch(run)
            run.epochs_done += 1
        lr_before = run.schedule.lr_at(at - 1)
        before = _lossacc(ev(run.model, setup.test_loader, run.device, setup.task, run.amp))
        tp = time.perf_counter()
        sharp_before = sharpness(run, seed) if full else None
        probe_s = time.perf_counter() - tp
        shapes = {n: tuple(p.shape) for n, p in run.model.named_parameters()}
        grow(run)
        rec = run.growths[-1]
        after = {"test_loss": rec["test_loss_after"], "test_acc": rec["test_acc_after"]}
        if variant.get("opt") == "reset-grown":
            for n, p in run.model.named_parameters():
                if shapes.get(n) != tuple(p.shape):
                    run.optimizer.state.pop(p, None)
        if variant.get("lr") == "continue":
            run.schedule = FixedLR(lr_before)
        tp = time.perf_counter()
        sharp_after = sharpness(run, seed, hessian=full)
        after_fresh_bn = _lossacc(test_with_fresh_bn(run)) if full else None
        probe_s += time.perf_counter() - tp
        quarters: list[dict[str, Any]] = []
        inner = setup.train_loader
        setup.train_loader = QuarterLoader(run, quarters)
        try:
            epoch = train_epoch(run)
        finally:
            setup.train_loader = inner
        run.epochs_done += 1
        end = _lossacc(ev(run.model, setup.test_loader, run.device, setup.task, run.amp))
        tp = time.perf_counter()
        end_fresh_bn = _lossacc(test_with_fresh_bn(run))
        sharp_end = sharpness(run, seed) if full else None
        probe_s += time.perf_counter() - tp
    safety = rec.get("safety") or {}
    return {
        "setting": setting,
        "method": method,
        "variant": variant_name,
        "variant_spec": variant,
        "seed": seed,
        "grow_after_epoch": at,
        "params": [rec.get("params_before"), rec.get("params_after")],
        "units_split": rec.get("units_split"),
        "units_added": rec.get("units_added"),
        "outcome": safety.get("outcome"),
        "amplitude": safety.get("amplitude"),
        "predicted": rec.get("predicted_loss_change"),
        "heldout_change": rec.get("heldout_loss_change"),
        "lr_before": lr_before,
        "lr_after": epoch["lr"],
        "before": before,
        "after_growth": after,
        "after_growth_fresh_bn": after_fresh_bn,
        "quarters": quarters,
        "after_epoch": end,
        "after_epoch_fresh_bn": end_fresh_bn,
        "train_loss_epoch_after": epoch["train_loss"],
        "probes": probes,
        "sharpness_probe": {"perturb_examples": 512, "perturb_draws": 3, "hessian_batch": 128, "power_iters": 12},
        "sharpness_before": sharp_before,
        "sharpness_after_growth": sharp_after,
        "sharpness_after_epoch": sharp_end,
        "config": {"growth_kwargs": dict(cfg.growth.kwargs)},
        "environment": environment(),
        "wall_s": time.perf_counter() - t0,
        "probe_s": probe_s,
    }


def path_of(setting: str, method: str, variant: str, seed: int) -> Path:
    return RESULTS / f"{setting}-{method}-{variant}-s{seed}.json"


def load_all() -> list[dict[str, Any]]:
    return [r for p in sorted(RESULTS.glob("*.json")) if (r := read_json(p))]


def _f(v: float | None, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def _ci(diffs: Sequence[float]) -> str:
    c = ci95(diffs)
    return "–" if c is None else f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]"


def table(setting: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Per seed: test loss right after growth and one epoch later for a (method, variant) pair, then the mean and
    the 95 % t-interval of the paired difference (first − second); also one epoch later with BatchNorm statistics
    re-estimated on the training set (a probe) and the train-mode loss over that epoch."""
    recs = {(r["method"], r["variant"], r["seed"]): r for r in load_all() if r["setting"] == setting}
    (ma, va), (mb, vb) = pairs[0], pairs[1]
    seeds = sorted({s for (m, v, s) in recs if (m, v) == (ma, va)} & {s for (m, v, s) in recs if (m, v) == (mb, vb)})
    a, b = f"{ma}/{va}", f"{mb}/{vb}"
    keys = (
        ("after growth", lambda r: dig(r, "after_growth", "test_loss")),
        ("+1 epoch", lambda r: dig(r, "after_epoch", "test_loss")),
        ("+1 epoch, fresh BN", lambda r: dig(r, "after_epoch_fresh_bn", "test_loss")),
        ("train loss of that epoch", lambda r: r.get("train_loss_epoch_after")),
    )
    out = [
        f"**{setting}: {a} (A) vs {b} (B)**, test loss unless named; Δ = A − B",
        "",
        "| seed | " + " | ".join(f"{k} A | {k} B | Δ" for k, _ in keys) + " |",
        "|---:|" + "---:|---:|---:|" * len(keys),
    ]
    diffs: dict[str, list[float]] = {k: [] for k, _ in keys}
    for s in seeds:
        cells = []
        for k, fn in keys:
            x, y = fn(recs[(ma, va, s)]), fn(recs[(mb, vb, s)])
            if x is None or y is None:
                cells.append(f"{_f(x)} | {_f(y)} | –")
                continue
            diffs[k].append(x - y)
            cells.append(f"{_f(x)} | {_f(y)} | {x - y:+.3f}")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    means = []
    for k, fn in keys:
        xa = [v for v in (fn(recs[(ma, va, s)]) for s in seeds) if v is not None]
        xb = [v for v in (fn(recs[(mb, vb, s)]) for s in seeds) if v is not None]
        ma_, mb_ = (_f(statistics.fmean(x)) if x else "–" for x in (xa, xb))
        means.append(f"{ma_} | {mb_} | {_ci(diffs[k])}")
    out.append(f"| mean (n={len(seeds)}) | " + " | ".join(means) + " |")
    out.append("")
    return "\n".join(out)


def dig(rec: dict[str, Any], *keys: str) -> Any:
    """rec[k1][k2]..., None where a level is missing (light-probe runs have no Hessian numbers)."""
    for k in keys:
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec


def diagnosis(setting: str) -> str:
    """One row per (method, variant): means over the seeds both methods ran with that variant (a Firefly-only
    variant: its own seeds) of every measurement."""
    groups: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in load_all():
        if r["setting"] == setting:
            groups.setdefault((r["method"], r["variant"]), {})[r["seed"]] = r
    out = [
        f"**{setting}: means over the seeds both methods ran**",
        "",
        "| method | variant | seeds | before | after growth | q1 | q2 | q3 | +1 epoch | +1 epoch fresh BN "
        "| train loss of that epoch | perturb rise after growth | λmax after growth |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (m, v), by_seed in sorted(groups.items()):
        common = set(by_seed)
        for (m2, v2), other in groups.items():
            if v2 == v and m2 != m:
                common &= set(other)
        rs = [by_seed[s] for s in sorted(common)]
        if not rs:
            continue

        def mean(fn: Any, d: int = 3, rs: list[dict[str, Any]] = rs) -> str:
            vals = [x for x in (fn(r) for r in rs) if x is not None]
            return _f(statistics.fmean(vals), d) if vals else "–"

        qs = [
            mean(lambda r, q=q: next((x["test_loss"] for x in r["quarters"] if x["quarter"] == q), None))
            for q in (1, 2, 3)
        ]
        out.append(
            f"| {m} | {v} | {','.join(str(r['seed']) for r in rs)} "
            f"| {mean(lambda r: dig(r, 'before', 'test_loss'))} "
            f"| {mean(lambda r: dig(r, 'after_growth', 'test_loss'))} "
            f"| {' | '.join(qs)} | {mean(lambda r: dig(r, 'after_epoch', 'test_loss'))} "
            f"| {mean(lambda r: dig(r, 'after_epoch_fresh_bn', 'test_loss'))} "
            f"| {mean(lambda r: r.get('train_loss_epoch_after'))} "
            f"| {mean(lambda r: dig(r, 'sharpness_after_growth', 'perturbed_rise'), 4)} "
            f"| {mean(lambda r: dig(r, 'sharpness_after_growth', 'hessian_top'), 1)} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=["resnet", "mlp"], default="resnet")
    ap.add_argument("--methods", nargs="+", default=["firefly", "random"])
    ap.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--probes", choices=["full", "light"], default="full", help="light: no Hessian probes")
    ap.add_argument("--table", action="store_true", help="print the tables from the saved results")
    ap.add_argument(
        "--pair",
        nargs=2,
        metavar="METHOD/VARIANT",
        default=["firefly/base", "random/base"],
        help="the two runs --table compares, paired by seed",
    )
    args = ap.parse_args(argv)
    if args.table:
        pair = [tuple(p.split("/", 1)) for p in args.pair]
        print(table(args.setting, pair))
        print(diagnosis(args.setting))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed by seed, so an interrupted benchmark leaves pairs
        for variant in args.variants:
            for method in args.methods:
                p = path_of(args.setting, method, variant, seed)
                if p.exists():
                    continue
                if method != "firefly" and "grower" in VARIANTS[variant]:
                    continue  # a Firefly-only knob: random growth's run is the base one
                r = one_run(args.setting, method, variant, seed, args.probes)
                atomic_write_json(p, r)
                print(
                    f"{p.name}: before {r['before']['test_loss']:.3f} "
                    f"after growth {r['after_growth']['test_loss']:.3f} "
                    f"quarters {[round(q['test_loss'], 3) for q in r['quarters']]} +1 epoch "
                    f"{r['after_epoch']['test_loss']:.3f} (fresh BN {r['after_epoch_fresh_bn']['test_loss']}) "
                    f"{r['wall_s']:.0f}s",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
