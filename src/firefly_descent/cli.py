"""The ``firefly`` command line: train, resume, report, inspect and export growing networks.

    firefly configs                                   # built-in named configs
    firefly train fashion-vgg-firefly --set train.epochs=4 --out runs/ff
    firefly resume runs/ff                            # continue a killed run exactly
    firefly report runs/ff runs/static --out report   # table + plots
    firefly inspect runs/ff                           # newest checkpoint of a run, or a .pt file
    firefly export runs/ff/checkpoints/ckpt-000012-e0006.pt exported/

Bad input (missing file, bad config, unknown dataset, an output path that cannot be written) prints one
``error: ...`` line on stderr and exits with status 2 without writing anything. Set ``FIREFLY_DEBUG=1``
for tracebacks. torch is imported only by the commands that need it, so ``--help`` and config errors
are instant.
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


EPILOG = """\
environment:
  FIREFLY_DEBUG=1             show full tracebacks instead of one-line errors
  FIREFLY_PROGRESS_SECONDS=N  without a terminal, print a progress line at most every N seconds (default 30)
  FIREFLY_DATA_DIR=DIR        where datasets are looked for first (and a missing Fashion-MNIST is downloaded to)
  FIREFLY_OFFLINE=1           never download (nor apt-get install) a missing dataset
  FIREFLY_NO_APT=1            never apt-get install a missing dataset (root on Debian does by default)
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``firefly`` command."""
    p = _Parser(
        prog="firefly",
        description="Grow neural networks during training (Firefly descent).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    t.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    _add_nproc(t)

    c = sub.add_parser("configs", help="list the built-in named configs")
    c.add_argument("--show", metavar="NAME", default=None, help="print one named config's YAML")

    sub.add_parser("models", help="list the built-in models and their options (model.name, model.kwargs)")
    sub.add_parser("datasets", help="list the datasets and their options (data.name, data.kwargs)")

    r = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    _add_nproc(r)

    rep = sub.add_parser("report", help="compare runs: markdown table and PNG plots")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=None, help="output directory (default ./firefly-report)")

    i = sub.add_parser("inspect", help="describe a checkpoint: architecture, widths, params, FLOPs, growth")
    i.add_argument("checkpoint", type=Path, help="a checkpoint file, or a run directory (its newest checkpoint)")

    e = sub.add_parser("export", help="export a checkpoint as model.safetensors + architecture.json + config.yaml")
    e.add_argument("checkpoint", type=Path, help="a checkpoint file, or a run directory (its newest checkpoint)")
    e.add_argument("out_dir", type=Path, nargs="?", help="the folder to write (or --out, as train and report take)")
    e.add_argument("--out", type=Path, default=None, dest="out_flag", metavar="OUT_DIR", help=argparse.SUPPRESS)

    add_search_parser(sub)
    return p


# --------------------------------------------------------------------------- commands


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="run N processes on this machine with torch.distributed (DDP; gloo on CPU, nccl on CUDA; "
        "see docs/distributed.md)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from firefly_descent.train.config import load_config

    cfg = load_config(args.config, tuple(args.overrides))  # torch-free: a bad config fails instantly
    from firefly_descent.train import train

    if args.nproc is not None:
        from firefly_descent.train.launcher import launch_train

        return launch_train(args.config, args.out, tuple(args.overrides), args.nproc, args.no_progress)
    summary = train(cfg, args.out, progress=not args.no_progress)  # logs its own `done:` line
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes the plots
        _write_plots(summary)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from firefly_descent.train import resume

    if args.nproc is not None:
        from firefly_descent.train.launcher import launch_resume

        return launch_resume(args.run_dir, args.nproc, args.no_progress)
    summary = resume(args.run_dir, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0" and not summary.get("already_complete"):
        _write_plots(summary)
    return 0


def _write_plots(summary: dict[str, Any]) -> None:
    """The run's curves, accuracy-vs-parameters and widths plots, next to its logs (never fails the run)."""
    from firefly_descent.report import write_run_plots

    run_dir = summary.get("run_dir")
    if not run_dir:
        return
    try:
        paths = write_run_plots(run_dir)
    except Exception as e:  # plots are a convenience; the run itself is complete and saved
        print(f"warning: plots not written ({type(e).__name__}: {' '.join(str(e).split())[:200]})", file=sys.stderr)
        return
    if paths:
        print(f"plots: {', '.join(str(p) for p in paths)}")


def _cmd_configs(args: argparse.Namespace) -> int:
    from firefly_descent.train.config import ConfigError, configs_dir, named_configs

    names = named_configs()
    if args.show is not None:
        entry = configs_dir() / f"{args.show}.yaml"
        if not entry.is_file():
            raise ConfigError(f"configs --show: no named config {args.show!r}; named: {', '.join(names)}")
        sys.stdout.write(entry.read_text(encoding="utf-8"))
        return 0
    width = max((len(n) for n in names), default=0)
    for name, desc in names.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _options(spec: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in spec.items() if k not in skip) or "(no options)"


def _cmd_models(args: argparse.Namespace) -> int:
    from firefly_descent.models import available_models, model_spec

    names = available_models()
    width = max(len(n) for n in names)
    shape = ("in_channels", "in_features", "num_classes", "input_size")  # filled from the dataset
    for name in names:
        print(f"{name:<{width}}  {_options(model_spec(name), shape)}")
    print("\nyour own: model.name 'package.module:Class' (a class or function; the shape options it takes, "
          f"{', '.join(shape)}, come from the dataset)")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from firefly_descent.data.registry import available_datasets, dataset_options

    names = available_datasets()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {_options(dataset_options(name))}")
    print("\nevery dataset: data.root, train_subset, test_subset, val_fraction, batch_size, augment; "
          "arrays reads your own .npz or torch.save file (train_x, train_y, test_x, test_y)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from firefly_descent.paths import check_output_dir
    from firefly_descent.report import incomplete_note, make_report

    out = args.out if args.out is not None else Path("firefly-report")
    check_output_dir(out, "--out")
    result = make_report(args.run_dirs, out)
    print(result["table"])
    for row in result["rows"]:
        note = incomplete_note(row)
        if note:
            print(note)
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
    from firefly_descent.train.metrics import flops_per_example, param_count

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
    flops = flops_per_example(model, example)
    print()
    print(f"params      {param_count(model):,}")
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
    from firefly_descent.paths import check_output_dir

    if (args.out_dir is None) == (args.out_flag is None):
        print("error: export: give the output folder once: `firefly export RUN_DIR OUT_DIR` or --out OUT_DIR",
              file=sys.stderr)
        return 2
    args.out_dir = args.out_dir or args.out_flag

    check_output_dir(args.out_dir, "export")  # before loading anything
    from firefly_descent.exporting import export_checkpoint

    arch = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {arch['tensors']} tensors ({arch['params']:,} params) to {args.out_dir}")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "resume": _cmd_resume,
    "configs": _cmd_configs,
    "report": _cmd_report,
    "inspect": _cmd_inspect,
    "export": _cmd_export,
    "models": _cmd_models,
    "datasets": _cmd_datasets,
    "search": search_command,
}


# input errors by module and class name, looked up in sys.modules so that classifying an error never
# imports torch: an error of a class whose module was never loaded cannot have been raised
_INPUT_ERRORS = (
    ("firefly_descent.train.config", "ConfigError"),
    ("firefly_descent.train.checkpoint", "CheckpointError"),
    ("firefly_descent.report", "ReportError"),
    ("firefly_descent.data.errors", "DatasetError"),
    ("firefly_descent.paths", "OutputPathError"),
    ("firefly_descent.exporting", "ExportError"),
    ("firefly_descent.train.launcher", "LaunchError"),
)


def _is_input_error(e: BaseException) -> bool:
    for module, name in _INPUT_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``firefly`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from firefly_descent.errors import GrowthError

    debug = os.environ.get("FIREFLY_DEBUG", "") not in ("", "0")
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # `firefly inspect RUN | head`: the reader left; no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if not os.environ.get("FIREFLY_LAUNCHED"):  # a worker of `--nproc`: the launcher says it once
            print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if isinstance(e, OSError) and (e.filename is not None or isinstance(e, FileNotFoundError)):
            from firefly_descent.paths import os_error_line

            print(f"error: {os_error_line(e)}", file=sys.stderr)
            return 2
        if _is_input_error(e):
            print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
            return int(getattr(e, "exit_code", 2))
        if isinstance(e, (FloatingPointError, GrowthError)):
            what = "growth failed: " if isinstance(e, GrowthError) else ""
            print(
                f"error: {what}{' '.join(str(e).split())} (checkpoints kept; see FIREFLY_DEBUG=1)",
                file=sys.stderr,
            )
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
