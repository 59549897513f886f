"""Growing a small GPT on English text (issue 23, item 6): Firefly against static, random, Net2Net and
depth-stacking growth, with paired seeds.

Data: the English fortune-cookie files of Debian's `fortunes` package (`apt-get install fortunes`:
/usr/share/games/fortunes, about 2.3 MB of plain text), read as characters. The fortunes are assigned to
train or validation by their index (every 10th to validation), so validation text is text no run trained
on. Nothing is downloaded.

Model: a Hugging Face GPT-2 (`GPT2LMHeadModel`, built from a config, untied input/output embeddings, eager
attention so the FLOP counter sees the attention products), 2 blocks of width 32 with 2 heads of 16 and an
MLP of 128: 34 k parameters. Every run trains with AdamW (lr 3e-3, 100 warm-up steps, cosine to 10 %) on
windows of 64 characters, 32 per batch; every method sees the same batches for a given seed.

Methods (all grown methods get the same parameter budget at each growth step, so that the size follows
P0·4^(k/3) after step k and ends at ≈ 4× the start; every grower remaps AdamW's state):
- static-small: the starting model, never grown;
- static-final: a standard GPT-2 config whose size is closest to 4× the start, trained from scratch;
- firefly: `Firefly(candidates="all")`: new heads, wider MLPs, a wider residual stream (LayerNorm completed
  exactly) and new blocks (copies of a block with their residual outputs at zero), scored in one budget;
- firefly-silent (a diagnostic): Firefly's decision applied at amplitude 0 (`Plan.scaled(0)`): its units and
  their trained incoming rows, with outgoing weights, split steps and stream offsets at zero, so the step keeps
  the function; against firefly it isolates the function change, against random-matched the incoming rows;
- firefly-in1 (a diagnostic): Firefly with new units' incoming rows drawn at the scale of the existing units'
  (`init_new_in=1.0` instead of 0.5, relative);
- random-matched: at each step, random new units in the groups and numbers the firefly run of the same seed
  chose (its placement), and a copy of each block Firefly inserted there with its residual outputs at zero;
- random: random new units (heads, MLP, stream) under the same budget, function-preserving;
- net2net: Net2Net splits (duplicated units and heads, outgoing weights halved) under the same budget;
- stack: depth stacking: blocks duplicated in place with all their weights (not function-preserving, as in
  progressive stacking and G_stack), as many as the budget affords (at least one), spread over depth.

Measured: validation loss in bits per character every `eval_every` steps, right before and right after
each growth, against training tokens and training FLOPs (forward + backward ≈ 3× the forward FLOPs of the
model of the moment, counted by `torch.utils.flop_counter`); growth wall time. One JSON file per (method,
seed) under --out (resumable: finished runs are skipped); `--table` writes summary.md and the plots.

    python benchmarks/lm_growth.py --seeds 0 1 2 --out benchmarks/results/lm
    python benchmarks/lm_growth.py --table --out benchmarks/results/lm --img docs/img
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_docs import _plt, ci95  # noqa: E402
from results_io import atomic_write_json, environment, read_json, rel  # noqa: E402

from firefly_descent.analysis import analyze  # noqa: E402
from firefly_descent.budget import count_params  # noqa: E402
from firefly_descent.cost import flop_profile  # noqa: E402
from firefly_descent.engine import apply, plan_new_blocks  # noqa: E402
from firefly_descent.methods import make_grower  # noqa: E402
from firefly_descent.methods.baselines.random_growth import placement_of  # noqa: E402
from firefly_descent.plan import NewLayer, Plan  # noqa: E402

CORPUS = Path("/usr/share/games/fortunes")
METHODS = (
    "static-small", "static-final", "firefly", "firefly-silent", "firefly-in1", "random-matched", "random", "net2net",
    "stack",
)
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        steps=3000, grow_at=[500, 1000, 1500], eval_every=100, eval_batches=32, batch=32, context=64,
        growth_batches=12, width=32, layers=2, heads=2, factor=4.0,
    ),
    # seconds, for the tests: the same code on a tiny corpus
    "smoke": dict(
        steps=12, grow_at=[4, 8], eval_every=4, eval_batches=2, batch=4, context=16,
        growth_batches=6, width=16, layers=1, heads=2, factor=2.0,
    ),
}


# ---- data ---------------------------------------------------------------------------------------------
def read_corpus(root: Path) -> tuple[str, str]:
    """(train text, validation text): every regular file under `root` without an extension (the fortune
    files; `.dat` indexes and `.u8` links are skipped), split into fortunes at lines holding only "%", every
    10th fortune to validation."""
    if not root.is_dir():
        raise SystemExit(f"no text corpus at {root}: install it with `apt-get install fortunes` or pass --corpus DIR")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    pieces = []
    for p in files:
        pieces += [t.strip("\n") for t in p.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    pieces = [t for t in pieces if t.strip()]
    if len(pieces) < 20:
        raise SystemExit(f"{root} holds {len(pieces)} texts; the benchmark needs a corpus of at least 20")
    train = "\n\n".join(t for i, t in enumerate(pieces) if i % 10)
    val = "\n\n".join(t for i, t in enumerate(pieces) if i % 10 == 0)
    return train, val


class CharData:
    """Characters as ids, and windows of `context` + 1 characters drawn with a seeded generator."""

    def __init__(self, train: str, val: str) -> None:
        self.chars = sorted(set(train) | set(val))
        index = {c: i for i, c in enumerate(self.chars)}
        self.train = torch.tensor([index[c] for c in train], dtype=torch.long)
        self.val = torch.tensor([index[c] for c in val], dtype=torch.long)

    @property
    def vocab(self) -> int:
        return len(self.chars)

    @staticmethod
    def batch(ids: torch.Tensor, n: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(ids) - context - 1, (n,), generator=gen)
        windows = torch.stack([ids[s : s + context + 1] for s in start.tolist()])
        return windows[:, :-1], windows[:, 1:]


# ---- model --------------------------------------------------------------------------------------------
def gpt2(vocab: int, context: int, width: int, layers: int, heads: int, seed: int) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=heads, n_inner=4 * width,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"  # the FLOP counter does not see the CPU's fused attention kernel
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def final_config(vocab: int, context: int, target: int) -> dict[str, int]:
    """The standard GPT-2 shape (heads of 16, MLP 4× the width) whose size is closest to `target`."""
    best = None
    for width in (16, 32, 48, 64, 80, 96, 128):
        for layers in (1, 2, 3, 4, 6, 8):
            n = count_params(gpt2(vocab, context, width, layers, max(1, width // 16), 0))
            if best is None or abs(n - target) < abs(best[0] - target):
                best = (n, dict(width=width, layers=layers, heads=max(1, width // 16)))
    assert best is not None
    return best[1]


def next_token_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def val_bpc(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was = model.training
    model.eval()
    loss = statistics.fmean(float(next_token_loss(model(x), y)) for x, y in batches)
    model.train(was)
    return loss / math.log(2)


# ---- growth -------------------------------------------------------------------------------------------
def stack_plan(model: nn.Module, x: torch.Tensor, budget: int) -> Plan:
    """Depth stacking: duplicate blocks in place with all their weights, as many as `budget` parameters
    afford (at least one), spread evenly over depth."""
    graph = analyze(model, (x,))
    blocks = [n for n in graph.boundaries if n.count(".") == 2 and n.startswith("transformer.h.")]
    size = [count_params(model.get_submodule(n)) for n in blocks]
    k = max(1, min(len(blocks), round(budget / (sum(size) / len(size)))))
    chosen = [blocks[round(i * (len(blocks) - 1) / max(1, k - 1))] for i in range(k)] if k > 1 else [blocks[-1]]
    layers = [NewLayer(name, "copy", {"type": "copy", "zero": []}) for name in dict.fromkeys(chosen)]
    return Plan(layers=layers, function_preserving=False)


def grow(method: str, model: nn.Module, opt: torch.optim.Optimizer, data: list[Any], budget: int, seed: int,
         epoch_batches: int, placement: dict[str, int] | None = None, blocks: list[str] = ()) -> dict[str, Any]:
    """One growth step of `method` with `budget` more parameters (or, for random-matched, the units
    `placement` names per group, then copies of the `blocks` Firefly inserted, residual outputs at zero);
    returns what it did."""
    t0 = time.perf_counter()
    if method == "firefly-silent":  # decide on a copy, apply the decision to the model at amplitude 0
        shadow = copy.deepcopy(model)
        grower = make_grower("firefly", budget=f"params:{budget}", seed=seed, candidates="all")
        grower.epoch_batches = epoch_batches
        grower.grow(shadow, data, next_token_loss)
        plan = grower.last_plan.scaled(0.0)
        if any(layer.kind == "copy" for layer in plan.layers):  # a kept block holds its trained outputs: not
            plan = Plan(plan.changes, function_preserving=True)  # silenced by a scale, so it is left out
        apply(model, plan, optimizer=opt, example_inputs=(data[0][0],))
        info = {"outcome": "applied", "units_added": {c.group.name: c.new.count for c in plan.changes if c.new},
                "units_split": {c.group.name: len(c.splits) for c in plan.changes if c.splits},
                "layers_inserted": [layer.after for layer in plan.layers]}
    elif method == "stack":
        plan = stack_plan(model, data[0][0], budget)
        apply(model, plan, optimizer=opt, example_inputs=(data[0][0],))
        info: dict[str, Any] = {"outcome": "applied", "layers_inserted": [layer.after for layer in plan.layers]}
    else:
        kw: dict[str, Any] = {"candidates": "all"} if method.startswith("firefly") else {}
        if method == "firefly-in1":
            method, kw = "firefly", {**kw, "init_new_in": 1.0}
        if method == "random-matched":
            method, kw = "random", {"placement": [placement or {}]}
        grower = make_grower(method, budget=f"params:{budget}", seed=seed, **kw)
        if method == "random" and blocks and not (placement or {}):
            grower = None  # Firefly only inserted blocks this step: nothing else to place
        report = None
        if grower is not None:
            grower.epoch_batches = epoch_batches
            report = grower.grow(model, data, next_token_loss, optimizer=opt)
        if blocks:  # matched placement in depth too: the blocks Firefly inserted, copies with zero outputs
            graph = analyze(model, (data[0][0],))
            apply(model, plan_new_blocks(graph, model, blocks), optimizer=opt, example_inputs=(data[0][0],))
        if report is None:
            return {"outcome": "applied", "units_added": {}, "units_split": {}, "layers_inserted": list(blocks),
                    "seconds": time.perf_counter() - t0}
        info = {
            "outcome": report.outcome,
            "units_added": report.units_added,
            "units_split": report.units_split,
            "layers_inserted": report.layers_inserted + list(blocks),
            "heldout_before": report.safety.heldout_before if report.safety else None,
            "heldout_after": report.safety.heldout_after if report.safety else None,
            # Firefly: every block candidate's score per cost against the best width score, the depth share
            "depth": report.extra.get("depth"),
            "skipped_groups": report.extra.get("skipped_groups"),
        }
    info["seconds"] = time.perf_counter() - t0
    return info


# ---- one run ------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float = 3e-3, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run(method: str, seed: int, cd: CharData, cfg: dict[str, Any], source: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """One training run; `source` is the firefly record of the same seed (random-matched reads its placement)."""
    ctx, bs = cfg["context"], cfg["batch"]
    placements = placement_of(source["growths"]) if source is not None else []
    small = dict(width=cfg["width"], layers=cfg["layers"], heads=cfg["heads"])
    p0 = count_params(gpt2(cd.vocab, ctx, **small, seed=seed))
    if method == "static-final":
        arch = final_config(cd.vocab, ctx, int(cfg["factor"] * p0))
    else:
        arch = small
    model = gpt2(cd.vocab, ctx, **arch, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01)
    train_gen = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(12345)  # the same validation windows for every run
    val = [CharData.batch(cd.val, bs, ctx, val_gen) for _ in range(cfg["eval_batches"])]
    growing = method not in ("static-small", "static-final")
    rows: list[dict[str, Any]] = []
    growths: list[dict[str, Any]] = []
    tokens, flops = 0, 0.0
    step_flops = 3 * bs * flop_profile(model, (val[0][0][:1],)).total
    start = time.perf_counter()

    def record(step: int, tag: str = "") -> None:
        rows.append({"step": step, "tokens": tokens, "train_flops": flops, "params": count_params(model),
                     "val_bpc": val_bpc(model, val), "tag": tag})

    record(0)
    steps = cfg["steps"]
    for step in range(steps):
        if growing and step in cfg["grow_at"]:
            k = cfg["grow_at"].index(step) + 1
            target = int(p0 * cfg["factor"] ** (k / len(cfg["grow_at"])))
            budget = max(1, target - count_params(model))
            if rows[-1]["step"] != step:
                record(step, "before-growth")
            growth_gen = torch.Generator().manual_seed(seed * 1000 + k)  # the same growth data for every method
            data = [CharData.batch(cd.train, bs, ctx, growth_gen) for _ in range(cfg["growth_batches"])]
            place = placements[k - 1] if k - 1 < len(placements) else None
            blocks = []
            if source is not None and k <= len(source["growths"]):
                blocks = source["growths"][k - 1].get("layers_inserted") or []
            info = grow(method, model, opt, data, budget, seed, cfg["eval_every"], place, blocks)
            info.update(step=step, budget=budget, target=target)
            step_flops = 3 * bs * flop_profile(model, (val[0][0][:1],)).total
            record(step, "after-growth")
            info["params_after"] = rows[-1]["params"]
            info["val_bpc_before"] = rows[-2]["val_bpc"]
            info["val_bpc_after"] = rows[-1]["val_bpc"]
            growths.append(info)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        x, y = CharData.batch(cd.train, bs, ctx, train_gen)
        opt.zero_grad(set_to_none=True)
        next_token_loss(model(x), y).backward()
        opt.step()
        tokens += x.numel()
        flops += step_flops
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            record(step + 1)
    return {
        "method": method, "seed": seed, "config": cfg, "arch_start": arch, "params_start": p0,
        "rows": rows, "growths": growths, "final_val_bpc": rows[-1]["val_bpc"], "final_params": count_params(model),
        "seconds": time.perf_counter() - start, "vocab": cd.vocab, "env": environment(),
    }


# ---- tables and plots ----------------------------------------------------------------------------------
def _after_growth(rec: dict[str, Any], k: int, offset: int) -> float | None:
    """Validation bpc `offset` steps after growth step k (0: right after it)."""
    if len(rec["growths"]) <= k:
        return None
    at = rec["growths"][k]["step"] + offset
    if offset == 0:
        return rec["growths"][k]["val_bpc_after"]
    hit = [r["val_bpc"] for r in rec["rows"] if r["step"] == at and r["tag"] == ""]
    return hit[0] if hit else None


def bpc_at_flops(rec: dict[str, Any], flops: float) -> float | None:
    """Validation bpc of run `rec` when it had spent `flops` training FLOPs (linear between evaluations)."""
    rows = [r for r in rec["rows"] if r["tag"] != "before-growth"]
    for a, b in zip(rows, rows[1:]):
        if a["train_flops"] <= flops <= b["train_flops"] and b["train_flops"] > a["train_flops"]:
            t = (flops - a["train_flops"]) / (b["train_flops"] - a["train_flops"])
            return a["val_bpc"] + t * (b["val_bpc"] - a["val_bpc"])
    return None


def table(out: Path, img: Path | None) -> str:
    recs: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(out.glob("*-s*.json")):
        r = read_json(f)
        if r is not None:
            recs.setdefault(r["method"], []).append(r)
    if not recs:
        return "no results yet"
    static = {r["seed"]: r for r in recs.get("static-final", [])}
    lines = ["| method | seeds | params (final) | val bpc (final) | train FLOPs | growth s (total) | "
             "static-final at the same FLOPs |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in [m for m in METHODS if m in recs]:
        rs = recs[m]
        bpc = [r["final_val_bpc"] for r in rs]
        sd = statistics.stdev(bpc) if len(bpc) > 1 else 0.0
        params = statistics.fmean(r["final_params"] for r in rs)
        flops = statistics.fmean(r["rows"][-1]["train_flops"] for r in rs)
        growth_s = statistics.fmean(sum(g["seconds"] for g in r["growths"]) for r in rs)
        same = [bpc_at_flops(static[r["seed"]], r["rows"][-1]["train_flops"]) for r in rs if r["seed"] in static]
        same = [v for v in same if v is not None]
        lines.append(
            f"| {m} | {','.join(str(r['seed']) for r in rs)} | {params:,.0f} | "
            f"{statistics.fmean(bpc):.4f} ± {sd:.4f} | {flops:.3g} | {growth_s:.1f} | "
            + (f"{statistics.fmean(same):.4f} |" if same else "n/a |")
        )
    lines += ["", "Paired differences, firefly − method (bits per character; negative = Firefly lower), "
              "95 % t interval over seeds:", "",
              "| vs | n | final | right after growth 1 | 100 steps after growth 1 | right after last growth | "
              "firefly lower (final) |", "|---|---:|---|---|---|---|---:|"]
    ff = {r["seed"]: r for r in recs.get("firefly", [])}
    for m in [m for m in METHODS if m in recs and m != "firefly"]:
        other = {r["seed"]: r for r in recs[m]}
        seeds = sorted(set(ff) & set(other))
        cells = []
        for fn in (
            lambda r: r["final_val_bpc"],
            lambda r: _after_growth(r, 0, 0),
            lambda r: _after_growth(r, 0, 100),
            lambda r: _after_growth(r, len(r["growths"]) - 1, 0) if r["growths"] else None,
        ):
            d = [fn(ff[s]) - fn(other[s]) for s in seeds if fn(ff[s]) is not None and fn(other[s]) is not None]
            ci = ci95(d)
            cells.append(f"{ci[0]:+.4f} [{ci[1]:+.4f}, {ci[2]:+.4f}]" if ci else ("n/a" if not d else f"{d[0]:+.4f}"))
        wins = sum(ff[s]["final_val_bpc"] < other[s]["final_val_bpc"] for s in seeds)
        lines.append(f"| {m} | {len(seeds)} | " + " | ".join(cells) + f" | {wins}/{len(seeds)} |")
    lines += ["", "Growth steps (mean over seeds): params after, val bpc right before → right after", "",
              "| method | step | params after | bpc before | bpc after | kept (outcome) |",
              "|---|---:|---:|---:|---:|---|"]
    for m in [m for m in METHODS if m in recs]:
        for k in range(max(len(r["growths"]) for r in recs[m])):
            gs = [r["growths"][k] for r in recs[m] if len(r["growths"]) > k]
            outcomes = ",".join(sorted({g["outcome"] for g in gs}))
            lines.append(
                f"| {m} | {gs[0]['step']} | {statistics.fmean(g['params_after'] for g in gs):,.0f} | "
                f"{statistics.fmean(g['val_bpc_before'] for g in gs):.4f} | "
                f"{statistics.fmean(g['val_bpc_after'] for g in gs):.4f} | {outcomes} |"
            )
    if img is not None:
        plt = _plt()
        for key, label, name in (("tokens", "training tokens", "tokens"), ("train_flops", "training FLOPs", "flops")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for m in [m for m in METHODS if m in recs]:
                rows = [[r for r in rec["rows"] if r["tag"] != "before-growth"] for rec in recs[m]]
                n = min(len(r) for r in rows)
                xs = [statistics.fmean(r[i][key] for r in rows) for i in range(n)]
                ys = [statistics.fmean(r[i]["val_bpc"] for r in rows) for i in range(n)]
                ax.plot(xs, ys, label=f"{m} (n={len(recs[m])})", lw=1.2)
            ax.set_xlabel(label)
            ax.set_ylabel("validation bits per character")
            ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
            ax.set_title("GPT-2 grown on fortunes: mean over each method's seeds")
            ax.legend()
            img.mkdir(parents=True, exist_ok=True)
            path = img / f"lm-growth-bpc-vs-{name}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            lines.append(f"\n![validation bpc vs {label}]({rel(path)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="run nothing: write summary.md (and plots with --img)")
    ap.add_argument("--img", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.table:
        text = table(args.out, args.img)
        (args.out / "summary.md").write_text(text + "\n")
        print(text)
        return 0
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    cd = CharData(*read_corpus(args.corpus))
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    for seed in args.seeds:
        for m in methods:
            path = args.out / f"{m}-s{seed}.json"
            if read_json(path) is not None:
                continue
            source = None
            if m == "random-matched":
                source = read_json(args.out / f"firefly-s{seed}.json")
                if source is None:
                    print(f"random-matched seed {seed}: skipped, firefly-s{seed}.json is not there yet", flush=True)
                    continue
            rec = run(m, seed, cd, cfg, source)
            rec["command"] = " ".join(["python"] + sys.argv)
            rec["preset"] = args.preset
            atomic_write_json(path, rec)
            print(f"{m} seed {seed}: val bpc {rec['final_val_bpc']:.4f}, params {rec['final_params']:,}, "
                  f"{rec['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
