"""Typed run configuration: dataclasses, YAML loading, ``--set`` overrides and validation.

Every problem raises :class:`ConfigError` with ONE line naming the dotted key and what is
allowed, e.g. ``optim.name: 'sgdd' is not one of sgd, adam, adamw``. Validation never
touches the disk, so the CLI can refuse a bad config before creating a run directory.

Growth schedule semantics: growth happens *after* training epoch ``E`` (1-based) and before
epoch ``E + 1``. With ``growth.every = N`` the growth epochs are ``W, W + N, W + 2N, ...``
where ``W = growth.warmup_epochs`` (default ``N``), all strictly below ``train.epochs``;
``growth.at`` lists them explicitly instead. ``schedule.milestones`` are *fractions* of a
learning-rate phase: the whole run, or (with ``restart_after_growth``) the epochs between
two growths, as in the paper's code. The ``step`` schedule changes the rate at epoch boundaries
only, so milestone ``m`` acts only in phases of at least ``1 / (1 - m)`` epochs (0.75 needs 4); a
run whose phases are all shorter says so when it starts (train/schedule.py).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "GrowthConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "build_section",
    "config_from_dict",
    "config_to_dict",
    "configs_dir",
    "growth_epochs",
    "load_config",
    "named_configs",
    "parse_override",
]


class ConfigError(ValueError):
    """A configuration problem; the message is one line starting with the dotted key."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class DataConfig:
    """Which dataset to load and how to batch it (see `firefly_descent.data.load_dataset`)."""

    name: str = "digits"
    root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    val_fraction: float = 0.0
    batch_size: int = 128
    eval_batch_size: int | None = None
    augment: str | None = "default"
    num_workers: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A model from `firefly_descent.models` by name, or your own as an import path `package.module:Class`
    (a class or function called with `kwargs`); shape keys it takes are filled from the dataset."""

    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer and loss options."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule; milestones are fractions of a phase (run, or span between growths)."""

    name: Literal["step", "cosine", "constant"] = "step"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    min_lr: float = 0.0
    restart_after_growth: bool = True
    # step: a milestone acts at the batch where the phase reaches it, not at the next epoch boundary, so a phase
    # of one epoch (a growth every epoch, or the last epoch after a growth) decays too
    step_per_batch: bool = False
    # epochs over which the rate ramps linearly, after each growth, from the rate in use before it to the
    # schedule's (0 = jump at once); see benchmarks/README.md, "Head start after growth"
    warmup_after_growth: float = 0.0


@dataclass
class GrowthConfig:
    """When and how to grow: a method from `firefly_descent.methods` and its schedule/budget."""

    method: str = "static"
    kwargs: dict[str, Any] = field(default_factory=dict)
    every: int | None = None
    warmup_epochs: int | None = None
    at: list[int] | None = None
    max_growths: int | None = None
    # one budget per growth step, replacing the grower's own (`growth.kwargs.budget`) at that step: step k uses
    # budgets[k] (0.35, "params:20000", ...), later steps the grower's own. How a suite gives every method the
    # parameters another method's run spent in each round (budget-matched peers)
    budgets: list[Any] | None = None
    max_params: int | None = None
    max_flops: int | None = None
    refresh_bn: bool = True
    refresh_bn_batches: int | None = 50
    # rewrite new units' BatchNorm channels so train mode computes what eval mode scored (engine/calibrate.py;
    # refresh_bn_batches batches). null = as the grower does it: every grower calibrates, except Firefly with
    # bn_mode "batch" (its default), which scores in train mode and so has nothing to calibrate; true is
    # refused there, false turns calibration off
    calibrate_new_bn: bool | None = None
    data_batches: int | None = None


@dataclass
class TrainConfig:
    """Run-level options."""

    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    log_every: int = 20
    deterministic: bool = True
    threads: int | None = None
    # TensorBoard scalars in <run>/tensorboard; off by default since tensorboard is an optional extra
    # (`pip install firefly-descent[tensorboard]`); on without it installed, a run says so once
    tensorboard: bool = False
    # scale-out options (train/precision.py, train/runtime.py, docs/distributed.md)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False


@dataclass
class CheckpointConfig:
    """Checkpoint retention (one is written every epoch and after every growth)."""

    keep_last: int = 2


@dataclass
class Config:
    """A whole run: every section has defaults, so a YAML file only lists what differs."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------- type checking


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against annotation `tp` (ints are accepted as floats)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(str(a) for a in args)}")
    if origin in (Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item, f"{key}[{i}]"))
            except _Mismatch:
                raise ConfigError(f"{key}[{i}]: expected {_describe(item)}, got {type(v).__name__} {v!r}") from None
        return out
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return copy.deepcopy(dict(value))
    raise _Mismatch  # pragma: no cover - unsupported annotation


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a raw mapping, refusing unknown keys and wrong types with one line naming
    the key under `prefix` (also used by `firefly search`'s config)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key; allowed keys: {', '.join(names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = build_section(tp, v, key)
            continue
        try:
            kwargs[k] = _coerce(v, tp, key)
        except _Mismatch:
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {type(v).__name__} {v!r}") from None
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Build and validate a `Config` from plain data (e.g. parsed YAML)."""
    cfg = build_section(Config, raw or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a config (the resolved form saved with a run)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- semantics


def growth_epochs(cfg: Config) -> list[int]:
    """The epochs (1-based) after which growth is planned, ignoring budget stops."""
    g, epochs = cfg.growth, cfg.train.epochs
    if g.at is not None:
        out = sorted(set(g.at))
    elif g.every is not None:
        start = g.every if g.warmup_epochs is None else g.warmup_epochs
        start = max(start, 1)
        out = list(range(start, epochs, g.every))
    else:
        out = []
    if g.max_growths is not None:
        out = out[: g.max_growths]
    return [e for e in out if 1 <= e < epochs]


_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def validate(cfg: Config) -> None:
    """Check values and cross-field constraints; raise `ConfigError` naming the key."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    d, o, s, g, t = cfg.data, cfg.optim, cfg.schedule, cfg.growth, cfg.train
    need(bool(cfg.name.strip()), "name: must be a non-empty string")
    need(bool(d.name.strip()), "data.name: must be a non-empty dataset name")
    need(d.batch_size >= 1, f"data.batch_size: must be an integer >= 1, got {d.batch_size}")
    need(
        d.eval_batch_size is None or d.eval_batch_size >= 1,
        f"data.eval_batch_size: must be null or an integer >= 1, got {d.eval_batch_size}",
    )
    need(0.0 <= d.val_fraction < 1.0, f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    for key in ("train_subset", "test_subset"):
        v = getattr(d, key)
        need(v is None or v >= 1, f"data.{key}: must be null or an integer >= 1, got {v}")
    need(d.num_workers >= 0, f"data.num_workers: must be an integer >= 0, got {d.num_workers}")
    need(bool(cfg.model.name.strip()), "model.name: must be a non-empty model name")

    need(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    need(0.0 <= o.momentum < 1.0, f"optim.momentum: must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(
        0.0 <= o.label_smoothing < 1.0,
        f"optim.label_smoothing: must be in [0, 1), got {o.label_smoothing}",
    )
    need(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        f"optim.betas: must be two numbers in [0, 1), got {o.betas}",
    )
    need(
        not (o.name == "sgd" and o.nesterov and o.momentum <= 0),
        "optim.nesterov: true requires optim.momentum > 0 (set optim.nesterov=false or a momentum)",
    )

    need(
        all(0.0 < m < 1.0 for m in s.milestones),
        f"schedule.milestones: must be fractions of a phase in (0, 1), got {s.milestones}",
    )
    need(
        list(s.milestones) == sorted(set(s.milestones)),
        f"schedule.milestones: must be strictly increasing, got {s.milestones}",
    )
    need(0.0 < s.gamma <= 1.0, f"schedule.gamma: must be in (0, 1], got {s.gamma}")
    need(0.0 <= s.min_lr < o.lr, f"schedule.min_lr: must be in [0, optim.lr={o.lr}), got {s.min_lr}")
    need(
        s.warmup_after_growth >= 0,
        f"schedule.warmup_after_growth: must be a number of epochs >= 0, got {s.warmup_after_growth}",
    )

    need(t.epochs >= 1, f"train.epochs: must be an integer >= 1, got {t.epochs}")
    need(t.log_every >= 1, f"train.log_every: must be an integer >= 1, got {t.log_every}")
    need(t.threads is None or t.threads >= 1, f"train.threads: must be null or >= 1, got {t.threads}")
    need(
        bool(_DEVICE_RE.match(t.device)),
        f"train.device: {t.device!r} is not one of auto, cpu, cuda, cuda:N, mps",
    )
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {cfg.checkpoint.keep_last}")

    need(bool(g.method.strip()), "growth.method: must be a grower name")
    need(g.every is None or g.every >= 1, f"growth.every: must be an integer >= 1, got {g.every}")
    need(
        g.warmup_epochs is None or g.warmup_epochs >= 0,
        f"growth.warmup_epochs: must be an integer >= 0, got {g.warmup_epochs}",
    )
    need(not (g.every is not None and g.at is not None), "growth.at: give growth.every or growth.at, not both")
    need(
        g.warmup_epochs is None or g.every is not None,
        "growth.warmup_epochs: only used with growth.every (set growth.every or drop warmup_epochs)",
    )
    last = t.epochs - 1
    allowed = f"allowed 1..{last}" if last >= 1 else "a 1-epoch run has no epoch to grow after"
    grows = g.method != "static"  # the static control never grows: its schedule cannot be wrong
    if g.at is not None and grows:
        outside = [e for e in g.at if not 1 <= e < t.epochs]
        if outside:
            inside = [e for e in g.at if 1 <= e < t.epochs]
            fix = (
                "--set growth.at=[" + ",".join(str(e) for e in inside) + "]"
                if inside
                else "--set growth.method=static (no growth) or a longer train.epochs"
            )
            raise ConfigError(
                f"growth.at: epoch {outside[0]} is outside the run; {allowed} "
                f"(growth happens after epoch E, train.epochs={t.epochs}); e.g. {fix}"
            )
        need(len(set(g.at)) == len(g.at), f"growth.at: epochs must be unique, got {g.at}")
    if g.every is not None and g.at is None and g.max_growths != 0 and grows:
        first = max(1, g.every if g.warmup_epochs is None else g.warmup_epochs)
        need(
            first < t.epochs,
            f"growth.every: first growth would be after epoch {first}, beyond the run "
            f"(train.epochs={t.epochs}); {allowed} for the first growth",
        )
    need(g.max_growths is None or g.max_growths >= 0, f"growth.max_growths: must be >= 0, got {g.max_growths}")
    need(g.max_params is None or g.max_params >= 1, f"growth.max_params: must be >= 1, got {g.max_params}")
    need(g.max_flops is None or g.max_flops >= 1, f"growth.max_flops: must be >= 1, got {g.max_flops}")
    need(
        g.refresh_bn_batches is None or g.refresh_bn_batches >= 1,
        f"growth.refresh_bn_batches: must be null or >= 1, got {g.refresh_bn_batches}",
    )
    need(
        g.data_batches is None or g.data_batches >= 1,
        f"growth.data_batches: must be null or >= 1, got {g.data_batches}",
    )
    if g.method != "static" and g.max_growths != 0:
        need(
            g.every is not None or g.at is not None,
            f"growth.every: method {g.method!r} needs a schedule; set growth.every or growth.at",
        )


# --------------------------------------------------------------------------- loading


def configs_dir() -> Any:
    """The folder of the built-in named configs (``firefly configs``)."""
    return resources.files("firefly_descent") / "configs"


def named_configs() -> dict[str, str]:
    """Built-in named configs: name -> first line of its description comment."""
    out: dict[str, str] = {}
    root = configs_dir()
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        text = entry.read_text(encoding="utf-8")
        desc = ""
        for line in text.splitlines():
            if line.startswith("#"):
                desc = line.lstrip("# ").strip()
                break
        out[entry.name[: -len(".yaml")]] = desc
    return out


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"{where}: not valid YAML ({first})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _read_text(path: Path) -> str:
    """A config file's text; a file that is not UTF-8 is refused naming its first bad byte and that byte's line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save the file as UTF-8"
        ) from None


def load_raw(source: str | Path) -> dict[str, Any]:
    """Read a YAML file, or a built-in named config, into plain data (no validation)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            run = (path / "config.yaml").is_file()
            hint = f"; a run directory: `firefly resume {path}` continues it" if run else ""
            raise ConfigError(f"config: {str(path)!r} is a directory, not a YAML config file{hint}")
        if not path.is_file():
            raise ConfigError(f"config: no such file {str(path)!r}")
        raw = _read_yaml(_read_text(path), str(path))
        raw.setdefault("name", path.stem)
        return raw
    entry = configs_dir() / f"{source}.yaml"
    if not entry.is_file():
        names = ", ".join(named_configs()) or "(none)"
        raise ConfigError(f"config: {str(source)!r} is neither a YAML file nor a named config; named: {names}")
    raw = _read_yaml(entry.read_text(encoding="utf-8"), f"config {source}")
    raw.setdefault("name", str(source))
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into its path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.SUB=VALUE")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY.SUB=VALUE with a dotted key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each ``key.sub=value`` override applied."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section; cannot set {'.'.join(path)}")
            node = nxt
        node[path[-1]] = value
    return out


def load_config(source: str | Path | Mapping[str, Any] | Config, overrides: Sequence[str] = ()) -> Config:
    """Load a config from a YAML path, a named config, a dict or a `Config`, apply overrides, validate."""
    if isinstance(source, Config):
        raw = config_to_dict(source)
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        raw = load_raw(source)
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)
