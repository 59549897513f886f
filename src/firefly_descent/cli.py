"""The ``firefly`` command line: train, resume, report, inspect and export growing networks.

    firefly configs                                   # built-in named configs
    firefly train fashion-vgg-firefly --set train.epochs=4 --out runs/ff
    firefly resume runs/ff                            # continue a killed run exactly
    firefly report runs/ff runs/static --out report   # table + plots
    firefly inspect runs/ff                           # newest checkpoint of a run, or a .pt file
    firefly export runs/ff/checkpoints/ckpt-000012-e0006.pt exported/

Bad input (missing file, bad config, unknown dataset) prints one ``error: ...`` line on stderr
and exits with status 2 without writing anything. Set ``FIREFLY_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firefly_descent.search.cli import add_parser as add_search_parser
from firefly_descent.search.cli import command as search_command

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``firefly`` command."""
    p = _Parser(prog="firefly", description="Grow neural networks during training (Firefly descent).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train (and grow) a model from a YAML config or a named config")
    t.add_argument("config", help="path to a YAML config, or a built-in name (see `firefly configs`)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override a config value (YAML-parsed), e.g. --set train.epochs=3; repeatable",
    )
    t.add_argument("--out", type=Path, default=None, help="run directory (default runs/<name>-<timestamp>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser("configs", help="list the built-in named configs")
    c.add_argument("--show", metavar="NAME", default=None, help="print one named config's YAML")

    r = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    rep = sub.add_parser("report", help="compare runs: markdown table and PNG plots")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=None, help="output directory (default ./firefly-report)")

    i = sub.add_parser("inspect", help="describe a checkpoint: architecture, widths, params, FLOPs, growth")
    i.add_argument("checkpoint", type=Path, help="a checkpoint file, or a run directory (its newest checkpoint)")

    e = sub.add_parser("export", help="export a checkpoint as model.safetensors + architecture.json + config.yaml")
    e.add_argument("checkpoint", type=Path, help="a checkpoint file, or a run directory (its newest checkpoint)")
    e.add_argument("out_dir", type=Path)

    add_search_parser(sub)
    return p


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    from firefly_descent.train import train

    summary = train(args.config, args.out, progress=not args.no_progress, overrides=tuple(args.overrides))
    _print_summary(summary)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from firefly_descent.train import resume

    summary = resume(args.run_dir, progress=not args.no_progress)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    acc = summary.get("final_test_acc")
    best = summary.get("best_test_acc")
    parts = [f"done: {summary.get('run_dir')}"]
    if acc is not None:
        parts.append(f"test acc {acc:.2%} (best {best:.2%})")
    elif summary.get("final_test_loss") is not None:
        parts.append(f"test loss {summary['final_test_loss']:.4g}")
    if summary.get("params") is not None:
        parts.append(f"params {summary['params']:,}")
    parts.append(f"growths {summary.get('num_growths', 0)}")
    if summary.get("total_time") is not None:
        parts.append(f"time {summary['total_time']:.1f}s")
    print(" | ".join(parts))


def _cmd_configs(args: argparse.Namespace) -> int:
    from firefly_descent.train.config import ConfigError, _configs_dir, named_configs

    names = named_configs()
    if args.show is not None:
        entry = _configs_dir() / f"{args.show}.yaml"
        if not entry.is_file():
            raise ConfigError(f"configs --show: no named config {args.show!r}; named: {', '.join(names)}")
        sys.stdout.write(entry.read_text(encoding="utf-8"))
        return 0
    width = max((len(n) for n in names), default=0)
    for name, desc in names.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from firefly_descent.report import make_report

    out = args.out if args.out is not None else Path("firefly-report")
    result = make_report(args.run_dirs, out)
    print(result["table"])
    print(f"\nwrote {result['markdown']}")
    for path in result["plots"]:
        print(f"wrote {path}")
    return 0


def _load_model(path: Path) -> tuple[dict[str, Any], Any]:
    from firefly_descent.train.checkpoint import load_checkpoint, rebuild_model

    ckpt = load_checkpoint(path)
    model = rebuild_model(ckpt)
    model.eval()
    return ckpt, model


def _cmd_inspect(args: argparse.Namespace) -> int:
    from firefly_descent.train.loop import _count_flops, _count_params

    ckpt, model = _load_model(args.checkpoint)
    cfg = ckpt["config"]
    ds = ckpt.get("dataset", {})
    example = ckpt["example_inputs"]
    print(f"checkpoint  {ckpt['path']}")
    where = "after growth" if Path(ckpt["path"]).stem.endswith("g") else "epoch end"
    print(
        f"run         {cfg.get('name')}: epoch {ckpt['epoch']}/{cfg['train']['epochs']}, "
        f"step {ckpt['step']}, {ckpt['num_growths']} growth(s), {where}"
    )
    shape = tuple(ds.get("input_shape", ()))
    print(f"dataset     {ds.get('name')} input {shape} classes {ds.get('num_classes')}")
    print(f"model       {ckpt['model']['name']} {json.dumps(ckpt['model']['kwargs'])}")
    print()
    print(model)
    print()
    print("widths per growable group:")
    try:
        from firefly_descent.analysis import analyze

        graph = analyze(model, (example,))
        groups = graph.groups.values() if isinstance(graph.groups, dict) else graph.groups
        for g in groups:
            blocked = getattr(g, "blocked", None)
            if isinstance(blocked, (tuple, list)) and blocked:
                blocked = blocked[-1]
            note = f"  (fixed: {blocked})" if blocked else ""
            print(f"  {g.name:<48} {g.width:>6}{note}")
    except Exception as e:  # analysis is informative here; never fail inspect over it
        print(f"  unavailable ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    flops = _count_flops(model, example)
    print()
    print(f"params      {_count_params(model):,}")
    print(f"FLOPs       {flops:,} per example" if flops is not None else "FLOPs       unavailable")
    reports = ckpt.get("growth_reports") or []
    history = ckpt.get("growth_history") or []
    print(f"growth      {len(reports)} growth(s), {len(history)} recorded change(s) in the growth history")
    for r in reports:
        added = sum((r.get("units_added") or {}).values())
        split = sum((r.get("units_split") or {}).values())
        layers = len(r.get("layers_inserted") or [])
        print(
            f"  #{r.get('index')} after epoch {r.get('epoch')} [{r.get('method')}]: "
            f"params {r.get('params_before', 0):,} -> {r.get('params', r.get('params_after', 0)):,}, "
            f"split {split}, new {added}, layers {layers}, {r.get('time', 0.0):.2f}s"
        )
    if ckpt.get("metrics"):
        last = ckpt["metrics"][-1]
        acc = last.get("test_acc")
        print(
            f"last epoch  {last['epoch']}: train loss {last['train_loss']:.4f}, "
            f"test loss {last['test_loss']:.4f}" + (f", test acc {acc:.2%}" if acc is not None else "")
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import yaml
    from safetensors.torch import save_file

    from firefly_descent.train.loop import _count_params

    ckpt, model = _load_model(args.checkpoint)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    arch = {
        "model": ckpt["model"],
        "growth_history": ckpt.get("growth_history") or [],
        "dataset": ckpt.get("dataset"),
        "params": _count_params(model),
        "epoch": ckpt["epoch"],
        "num_growths": ckpt["num_growths"],
        "source_checkpoint": ckpt["path"],
        "torch_version": ckpt.get("torch_version"),
    }
    (out / "architecture.json").write_text(json.dumps(arch, indent=2) + "\n", encoding="utf-8")
    (out / "config.yaml").write_text(
        yaml.safe_dump(ckpt["config"], sort_keys=False, default_flow_style=None), encoding="utf-8"
    )
    print(f"exported {len(tensors)} tensors ({arch['params']:,} params) to {out}")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "resume": _cmd_resume,
    "configs": _cmd_configs,
    "report": _cmd_report,
    "inspect": _cmd_inspect,
    "export": _cmd_export,
    "search": search_command,
}


def _input_errors() -> tuple[type[BaseException], ...]:
    from firefly_descent.report import ReportError
    from firefly_descent.train.checkpoint import CheckpointError
    from firefly_descent.train.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, ReportError, FileNotFoundError]
    try:
        from firefly_descent.data import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``firefly`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from firefly_descent.errors import GrowthError

    debug = os.environ.get("FIREFLY_DEBUG", "") not in ("", "0")
    input_errors = _input_errors()
    try:
        return _COMMANDS[args.command](args)
    except input_errors as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename:
            msg = f"{e.filename}: no such file or directory"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FloatingPointError, GrowthError) as e:
        if debug:
            raise
        what = "growth failed: " if isinstance(e, GrowthError) else ""
        print(
            f"error: {what}{' '.join(str(e).split())} (checkpoints kept; see FIREFLY_DEBUG=1)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
