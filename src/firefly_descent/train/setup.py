"""Everything a run builds from its config before it writes anything: data, model, grower, checks.

`prepare` seeds, loads the data, builds the model and the grower through their public registries
(`firefly_descent.data`, `firefly_descent.models`, `firefly_descent.methods`) and checks the growth limits,
turning every bad option into a one-line `ConfigError`. A ``replayed-architecture`` model given by
``model.kwargs.run`` is resolved here into the constructor and growth history it names, so the run
(its config, checkpoints and exports) holds its architecture itself and works from any directory.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..budget import Budget
from ..data import DatasetError, load_dataset, make_loaders
from ..errors import GrowthError
from ..methods import available_growers, make_grower
from ..methods.base import grower_takes
from ..models import available_models, build_model, model_spec
from .checkpoint import load_checkpoint
from .config import Config, ConfigError, growth_epochs
from .device import resolve_device, seed_everything
from .metrics import flops_per_example, param_count
from .rundir import CheckpointError
from .threads import busy_notice, choose_threads

__all__ = ["RunSetup", "build_model_for", "prepare", "resolve_replayed"]

REPLAYED = "replayed-architecture"


def resolve_replayed(cfg: Config) -> Config:
    """`cfg` with a ``replayed-architecture`` model's ``run`` replaced by what it reads from that run
    (``base``, ``base_kwargs``, ``history``): the same model, without a path that only works from here."""
    kw = dict(cfg.model.kwargs)
    if cfg.model.name.strip().lower().replace("_", "-") != REPLAYED or kw.get("run") is None:
        return cfg
    try:
        ckpt = load_checkpoint(kw.pop("run"))
    except CheckpointError as e:
        raise ConfigError(f"model.kwargs.run: {e}") from None
    kw.update(
        base=ckpt["model"]["name"],
        base_kwargs=dict(ckpt["model"]["kwargs"]),
        history=list(ckpt.get("growth_history") or []),
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs=kw))


def build_model_for(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """Build the configured model, filling shape options (``in_features``, ``in_channels``,
    ``input_size``, ``num_classes``) from the dataset unless given. Returns (model, kwargs)."""
    name = cfg.model.name
    try:
        spec = model_spec(name)
    except ValueError as e:
        if ":" in name:  # an import path: say what failed
            raise ConfigError(f"model.name: {' '.join(str(e).split())}") from None
        raise ConfigError(
            f"model.name: unknown model {name!r}; allowed: {', '.join(available_models())}, "
            "or your own as 'package.module:Class'"
        ) from None
    kw = dict(cfg.model.kwargs)
    if "num_classes" in spec and "num_classes" not in kw:
        kw["num_classes"] = int(num_classes)
    if "in_features" in spec and "in_features" not in kw and spec["in_features"] is not None:
        kw["in_features"] = int(math.prod(input_shape))
    if len(input_shape) >= 2 and "in_channels" in spec and "in_channels" not in kw:
        kw["in_channels"] = int(input_shape[0])
    if len(input_shape) == 3 and "input_size" in spec and "input_size" not in kw:
        kw["input_size"] = int(input_shape[-1])
    try:
        model = build_model(name, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs: {' '.join(str(e).split())}") from None
    return model, kw


@dataclass
class RunSetup:
    """Everything built from a config before anything is written to disk."""

    cfg: Config
    device: torch.device
    bundle: Any
    train_loader: Any
    val_loader: Any
    test_loader: Any
    model: nn.Module
    model_kwargs: dict[str, Any]
    grower: Any
    task: str
    num_outputs: int
    example_inputs: torch.Tensor
    planned: list[int] = field(default_factory=list)


def _load_data(cfg: Config) -> tuple[Any, Any, Any, Any]:
    d, t = cfg.data, cfg.train
    try:
        bundle = load_dataset(
            d.name,
            d.root,
            val_fraction=d.val_fraction,
            seed=t.seed,
            train_subset=d.train_subset,
            test_subset=d.test_subset,
            augment=d.augment,
            **d.kwargs,
        )
        train_loader, val_loader, test_loader = make_loaders(
            bundle, d.batch_size, seed=t.seed, num_workers=d.num_workers, eval_batch_size=d.eval_batch_size
        )
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    except KeyError as e:
        raise ConfigError(f"data.name: unknown dataset {e}") from None
    return bundle, train_loader, val_loader, test_loader


def _make_grower(cfg: Config) -> Any:
    g = cfg.growth
    if g.method not in available_growers():
        raise ConfigError(f"growth.method: unknown method {g.method!r}; allowed: {', '.join(available_growers())}")
    kwargs = dict(g.kwargs)
    if "seed" not in kwargs and grower_takes(g.method, "seed"):
        kwargs["seed"] = cfg.train.seed  # growth randomness follows the run's seed unless set explicitly
    try:
        grower = make_grower(g.method, **kwargs)
        if callable(getattr(grower, "set_safeguard", None)):  # the grower makes BatchNorm ready to train itself
            grower.set_safeguard(calibrate_new_bn=g.calibrate_new_bn is not False, refresh_bn=g.refresh_bn)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"growth.kwargs: {' '.join(str(e).split())}") from None
    if g.budgets is not None:
        _check_budgets(g.method, grower, g.budgets)
    return grower


def _check_budgets(method: str, grower: Any, budgets: Any) -> None:
    """`growth.budgets` needs a grower with a `Budget` and a list of readable budget specs."""
    if not isinstance(budgets, list):
        raise ConfigError(f"growth.budgets: expected a list with one budget per growth step, not {budgets!r}")
    if not isinstance(getattr(grower, "budget", None), Budget):
        raise ConfigError(f"growth.budgets: growth method {method!r} has no budget to replace; drop growth.budgets")
    for k, spec in enumerate(budgets):
        try:
            Budget.parse(spec)
        except GrowthError as e:
            raise ConfigError(f"growth.budgets[{k}]: {e}") from None


def _check_limits(cfg: Config, model: nn.Module, example_inputs: torch.Tensor) -> None:
    g = cfg.growth
    params = param_count(model)
    if g.max_params is not None and g.max_params <= params:
        raise ConfigError(f"growth.max_params: {g.max_params:,} is not above the initial model's {params:,} parameters")
    if g.max_flops is not None:
        flops = flops_per_example(model, example_inputs)
        if flops is None:
            raise ConfigError("growth.max_flops: FLOP counting is unavailable for this model; use growth.max_params")
        if g.max_flops <= flops:
            raise ConfigError(f"growth.max_flops: {g.max_flops:,} is not above the initial model's {flops:,} FLOPs")


def _check_growable(model: nn.Module, example_inputs: torch.Tensor, grower: Any) -> None:
    """A model growth cannot read (data-dependent control flow, a forward that fails on meta tensors), one with
    nothing to grow, or one the method can grow nothing of is refused before the first epoch, not after it
    (the analysis traces a meta copy: the model is not touched)."""
    from ..analysis import analyze

    try:
        with torch.random.fork_rng(devices=[]):  # a check: the run's random numbers are those it would draw without
            graph = analyze(model, example_inputs, exclude=getattr(grower, "exclude", None))
    except GrowthError as e:
        why = " ".join(str(e).split()).replace("passed to `exclude=`", "named in growth.kwargs.exclude")
        if why.startswith("exclude:"):  # a name in growth.kwargs.exclude that the model does not have
            raise ConfigError(f"growth.kwargs.{why}") from None
        raise ConfigError(f"model.name: growth cannot analyse this model: {why}") from None
    inner = [b for b in graph.boundaries.values() if b.group in graph.groups and not graph.groups[b.group].at_output]
    if not graph.growable() and not inner:  # no unit to add and no place for a layer: every method would do nothing
        why = "; ".join(f"{g.name!r}: {g.blocked[1]}" for g in list(graph.groups.values())[:3] if g.blocked)
        raise ConfigError(
            f"growth: this model has nothing to grow ({why or 'no group of units'}); give it a hidden layer, "
            "or set growth.method: static"
        )
    select = getattr(grower, "select_groups", None)
    if select is not None:
        try:
            select(graph, model, {})
        except GrowthError as e:  # e.g. Firefly on groups it has no candidates for
            raise ConfigError(f"growth: {' '.join(str(e).split())}") from None


def prepare(cfg: Config) -> RunSetup:
    """Seed, load data, build model and grower, check the budget; raise `ConfigError` on bad input.

    The returned setup's `cfg` is `cfg` with a replayed architecture resolved (`resolve_replayed`)."""
    t = cfg.train
    device = resolve_device(t.device)
    threads = choose_threads(t.threads)
    if t.deterministic and device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    seed_everything(t.seed)

    bundle, train_loader, val_loader, test_loader = _load_data(cfg)
    task = "classification" if bundle.num_classes > 0 else "regression"
    if task == "classification":
        num_outputs = int(bundle.num_classes)
    else:
        tshape = tuple(bundle.train.targets.shape[1:])
        num_outputs = int(math.prod(tshape)) if tshape else 1
    cfg = resolve_replayed(cfg)
    model, model_kwargs = build_model_for(cfg, tuple(bundle.input_shape), num_outputs)
    model.to(device)

    grower = _make_grower(cfg)
    if getattr(grower, "needs_validation", False) and val_loader is None:
        raise ConfigError(
            f"data.val_fraction: growth method {cfg.growth.method!r} selects on validation data; "
            "set data.val_fraction > 0"
        )
    example_inputs = bundle.example_inputs(8).clone().to(device)
    _check_limits(cfg, model, example_inputs)
    if cfg.growth.method != "static" and growth_epochs(cfg):
        _check_growable(model, example_inputs, grower)
    notice = busy_notice(threads, t.threads) if device.type == "cpu" else None
    if notice:
        print(notice, file=sys.stderr, flush=True)
    return RunSetup(
        cfg=cfg,
        device=device,
        bundle=bundle,
        train_loader=train_loader,
        val_loader=val_loader,
        test_loader=test_loader,
        model=model,
        model_kwargs=model_kwargs,
        grower=grower,
        task=task,
        num_outputs=num_outputs,
        example_inputs=example_inputs,
        planned=growth_epochs(cfg),
    )


def refuse_calibration_without_effect(cfg: Config, grower: Any) -> None:
    """`growth.calibrate_new_bn: true` where the grower never calibrates (Firefly scoring with batch statistics)."""
    if cfg.growth.calibrate_new_bn and getattr(getattr(grower, "config", None), "bn_mode", None) == "batch":
        raise ConfigError(
            f"growth.calibrate_new_bn: {cfg.growth.method} with bn_mode 'batch' (its default) scores candidates with "
            "batch statistics and never calibrates new BatchNorm channels; drop the key, or calibrate with "
            "growth.kwargs.bn_mode: frozen"
        )
