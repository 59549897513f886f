"""Growth inside `transformers.Trainer`: a callback that grows at epoch ends, and the helpers that save,
reload and resume a grown model.

The Trainer owns the optimizer (wrapped by accelerate), the LR scheduler and the checkpoints. The callback
grows the unwrapped model in place through the engine, which remaps the unwrapped optimizer's state (old
parameters keep theirs, new ones start at zero); the scheduler holds the same optimizer, so it keeps working.
Growers take positional tensors and return one tensor, while Trainer models take keyword batches and return
a dict with `loss`: `_GrowthView` presents the model to the grower without copying it (it shares the model's
module, parameter and buffer tables, so every name and every edit is the model's own).

A grown model's architecture is its constructor plus its growth history: the callback writes
`firefly_history.json` into every checkpoint folder and into `args.output_dir` at the end of training (and
into `model.config.firefly_history` when the model has a config, so `save_model` anywhere carries it).
`load_grown(path, build)` rebuilds a saved model; `prepare_resume(model, checkpoint_dir)`, called before
`trainer.train(resume_from_checkpoint=...)`, regrows the model first, because the Trainer loads the weights
before any callback runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..engine import growth_history, replay_history, resize_to_shapes
from ..engine.apply import HISTORY_ATTR
from ..errors import GrowthError
from ..methods import make_grower
from ..methods.base import Grower, GrowthReport, model_device

__all__ = ["HISTORY_FILE", "FireflyTrainerCallback", "load_grown", "prepare_resume", "read_history", "save_history"]

HISTORY_FILE = "firefly_history.json"
_FORMAT = "firefly-descent-hf/1"
_MAX_INPUTS = 8  # keyword tensors a batch may carry into the growth view
log = logging.getLogger(__name__)


class _GrowthView(nn.Module):
    """The model as growers see models: positional tensors in (the batch's keys, in order), one tensor out
    (the model's own `loss`, or its `logits` for a loss function of the user's)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...], output: str) -> None:
        super().__init__()
        if len(keys) > _MAX_INPUTS:
            raise GrowthError(f"a growth batch may carry at most {_MAX_INPUTS} tensors, got {len(keys)}: {keys}")
        for table in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[table] = getattr(model, table)  # shared: the engine's edits land in `model`
        object.__setattr__(self, "_target", model)  # not a submodule: names stay the model's own
        self._keys = keys
        self._output = output
        self.training = model.training
        setattr(self, HISTORY_ATTR, growth_history(model))

    # a fixed signature (fx traces positional parameters; the unused ones stay None while tracing)
    def forward(self, a0: Any, a1: Any = None, a2: Any = None, a3: Any = None, a4: Any = None, a5: Any = None,
                a6: Any = None, a7: Any = None) -> torch.Tensor:
        values = (a0, a1, a2, a3, a4, a5, a6, a7)[: len(self._keys)]
        out = type(self._target).forward(self._target, **dict(zip(self._keys, values)))
        return _pick(out, self._output)

    def train(self, mode: bool = True) -> _GrowthView:
        super().train(mode)
        self._target.training = mode
        return self


def _pick(out: Any, key: str) -> torch.Tensor:
    """`key` ("loss" or "logits") of a model output: a dict / ModelOutput, a tuple (loss first when labels
    were given), or a tensor (the logits)."""
    if isinstance(out, Mapping):
        if key not in out:
            raise GrowthError(f"the model's output has no {key!r} (keys: {list(out)}); pass loss_fn= to the callback")
        return out[key]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _own_loss(loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model computed its loss itself (labels were among its inputs)."""
    return loss


def _dict_batch(batch: Any) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise GrowthError(
            f"FireflyTrainerCallback's default batch adapter takes dict batches (the Trainer's); got "
            f"{type(batch).__name__}: pass batch_adapter=fn returning a dict of the model's keyword tensors"
        )
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _unwrap_model(model: nn.Module) -> nn.Module:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise GrowthError("FireflyTrainerCallback grows single-process Trainer runs; under DDP grow with the "
                          "Lightning callback or `firefly train --nproc N`")
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """accelerate's AcceleratedOptimizer holds the real optimizer in `.optimizer`: remap that one."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _order_like_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Each param group in the model's parameter order, as an optimizer made from the grown model would hold
    it (so a checkpoint's optimizer state loads into the optimizer the Trainer makes on resume)."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for g in optimizer.param_groups:
        g["params"] = sorted(g["params"], key=lambda p: order.get(id(p), len(order)))


def _trainer_rule(model: nn.Module) -> dict[int, int] | None:
    """For each parameter, the group (0: weight decay, 1: none) an optimizer `Trainer.create_optimizer` made from
    `model` would put it in; None when the rule cannot be read."""
    try:
        decay = set(Trainer.get_decay_parameter_names(None, model))  # the rule reads only the model
    except (TypeError, AttributeError):
        return None
    return {id(p): 0 if n in decay else 1 for n, p in model.named_parameters()}


def _follows_rule(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Whether the optimizer's groups are the Trainer's two (weight decay, none), as `create_optimizer` makes them."""
    groups, rule = optimizer.param_groups, _trainer_rule(model)
    if rule is None or len(groups) != 2 or groups[1].get("weight_decay") != 0.0:
        return False
    return all(rule.get(id(p)) == i for i, g in enumerate(groups) for p in g["params"])


def _regroup(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Move each parameter to the group the Trainer's rule gives it (the engine puts a new layer's parameters
    in their neighbour's group: a new bias would otherwise decay, and a resumed run's fresh optimizer would
    not match the checkpoint's groups)."""
    rule = _trainer_rule(model)
    assert rule is not None
    now = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    for i, g in enumerate(optimizer.param_groups):
        g["params"] = [p for p in held if rule.get(id(p), now[id(p)]) == i]


def _growth_loader(dataloader: Any, seed: int) -> Iterable[Any]:
    """The train dataloader's dataset, batch size and collate function, in an order of its own (seeded): the
    growth step draws no number from the global generators and leaves accelerate's dataloader state alone."""
    base = getattr(dataloader, "base_dataloader", dataloader)
    if not isinstance(base, DataLoader):
        return dataloader
    batch_size = base.batch_size or getattr(base.batch_sampler, "batch_size", None) or 1
    if isinstance(base.dataset, IterableDataset):
        return DataLoader(base.dataset, batch_size=batch_size, collate_fn=base.collate_fn)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(base.dataset, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=base.collate_fn)


class FireflyTrainerCallback(TrainerCallback):
    """Grow the Trainer's model after the epochs in `at` (1-based: `at=[1]` grows after the first epoch), or
    after every `every`-th epoch, with `make_grower(method, **grower_kwargs)` (or `method`, a Grower itself).

    The growth loss is the model's own (`outputs["loss"]`, given `label_key` in the batch) unless `loss_fn
    (logits, labels)` is given; `batch_adapter(batch) -> dict` maps a train-dataloader batch to the model's
    keyword tensors (default: the tensors of a dict batch). Growth reads `data_batches` batches of the train
    dataset. Each step's `GrowthReport` is kept in `reports`, logged, and its numbers go to the Trainer's log
    history (`trainer.state.log_history`, saved in trainer_state.json).
    """

    def __init__(
        self,
        method: str | Grower = "firefly",
        at: Iterable[int] | None = None,
        every: int | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        batch_adapter: Callable[[Any], Mapping[str, torch.Tensor]] | None = None,
        label_key: str = "labels",
        data_batches: int | None = 32,
        seed: int = 0,
        **grower_kwargs: Any,
    ) -> None:
        if (at is None) == (every is None):
            raise GrowthError("FireflyTrainerCallback: give exactly one of at=[epochs] or every=N")
        if every is not None and int(every) < 1:
            raise GrowthError(f"FireflyTrainerCallback: every must be >= 1, got {every}")
        self.at = sorted({int(e) for e in at}) if at is not None else None
        self.every = int(every) if every is not None else None
        if isinstance(method, Grower) and grower_kwargs:
            raise GrowthError("FireflyTrainerCallback: options go to make_grower; a Grower instance takes none")
        self.grower: Grower = method if isinstance(method, Grower) else make_grower(method, **grower_kwargs)
        self.loss_fn = loss_fn
        self.batch_adapter = batch_adapter or _dict_batch
        self.label_key = label_key
        self.data_batches = data_batches
        self.seed = int(seed)
        self.reports: list[GrowthReport] = []

    def due(self, epoch: int) -> bool:
        """Whether the schedule grows after `epoch` (1-based)."""
        if self.at is not None:
            return epoch in self.at
        return epoch % self.every == 0  # type: ignore[operator]

    # ---- Trainer events ----------------------------------------------------------------------------
    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        epoch = int(round(state.epoch or 0))
        if self.due(epoch):
            report = self.grow(kwargs["model"], kwargs.get("optimizer"), kwargs["train_dataloader"])
            log.info("firefly growth after epoch %d (step %d): %s", epoch, state.global_step, report)
            state.log_history.append({"epoch": state.epoch, "step": state.global_step, **_log_record(report)})
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> TrainerControl:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            save_history(kwargs["model"], folder)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        if args.should_save:  # next to what trainer.save_model() writes by default
            os.makedirs(args.output_dir, exist_ok=True)
            save_history(kwargs["model"], args.output_dir)
        return control

    # ---- the growth step ---------------------------------------------------------------------------
    def grow(self, model: nn.Module, optimizer: Any, dataloader: Any) -> GrowthReport:
        """One growth step on the unwrapped `model`, remapping the unwrapped `optimizer` in place."""
        target = _unwrap_model(model)
        opt = _unwrap_optimizer(optimizer)
        n = len(growth_history(target))
        device = model_device(target)
        batches = []
        for batch in _growth_loader(dataloader, self.seed * 1_000_003 + n):
            if self.data_batches is not None and len(batches) >= self.data_batches:
                break
            batches.append({k: v.to(device) for k, v in self.batch_adapter(batch).items()})
        if not batches:
            raise GrowthError("FireflyTrainerCallback: the train dataloader yielded no batch to grow on")
        if self.label_key not in batches[0]:
            raise GrowthError(f"growth batches carry no {self.label_key!r} (keys: {list(batches[0])}): the loss "
                              "needs targets; set label_key= or pass a batch_adapter")
        own = self.loss_fn is None
        keys = tuple(k for k in batches[0] if own or k != self.label_key)
        data = [(tuple(b[k] for k in keys), b[self.label_key]) for b in batches]
        view = _GrowthView(target, keys, "loss" if own else "logits")
        devices = [device.index or 0] if device.type == "cuda" else []
        was = target.training
        trainer_groups = opt is not None and _follows_rule(opt, target)
        with torch.random.fork_rng(devices=devices):  # the run draws what it would draw without growth
            report = self.grower.grow(view, data, _own_loss if own else self.loss_fn, optimizer=opt)
        target.train(was)
        _set_history(target, growth_history(view))
        if opt is not None:
            if trainer_groups:
                _regroup(opt, target)
            _order_like_model(opt, target)
        self.reports.append(report)
        return report


def _log_record(report: GrowthReport) -> dict[str, Any]:
    """The report's numbers for the Trainer's log history (trainer_state.json)."""
    safety = getattr(report, "safety", None)
    return {
        "firefly/params_before": report.params_before,
        "firefly/params_after": report.params_after,
        "firefly/loss_before": report.loss_before,
        "firefly/loss_after": report.loss_after,
        "firefly/outcome": getattr(safety, "outcome", report.outcome),
        "firefly/widths_after": dict(report.widths_after),
    }


# ---- saving, loading, resuming ---------------------------------------------------------------------
def _set_history(model: nn.Module, history: list[dict[str, Any]]) -> None:
    setattr(model, HISTORY_ATTR, list(history))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # save_pretrained writes it into config.json
        config.firefly_history = list(history)


def save_history(model: nn.Module, directory: str) -> str:
    """Write `model`'s growth history to `directory/firefly_history.json`; returns the file's path."""
    path = os.path.join(directory, HISTORY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": _FORMAT, "history": growth_history(_unwrap_model(model))}, f)
    os.replace(tmp, path)
    return path


def read_history(directory: str) -> list[dict[str, Any]]:
    """The growth history saved in `directory` (firefly_history.json, else config.json's `firefly_history`);
    empty when the model there never grew."""
    path = os.path.join(directory, HISTORY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise GrowthError(f"{path} is not a firefly-descent growth history")
        return list(data["history"])
    config = os.path.join(directory, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            return list(json.load(f).get("firefly_history", []))
    return []


def prepare_resume(model: nn.Module, checkpoint_dir: str) -> nn.Module:
    """Regrow `model` (as constructed, or grown part way) to the architecture saved in `checkpoint_dir`.

    Call it before `trainer.train(resume_from_checkpoint=checkpoint_dir)`: the Trainer loads the weights
    before it makes the optimizer and before any callback runs, so the shapes must already match."""
    target = _unwrap_model(model)
    history, have = read_history(checkpoint_dir), growth_history(target)
    if history[: len(have)] != have:
        raise GrowthError(
            f"{checkpoint_dir}: the model grew differently from the saved one; pass a freshly built model"
        )
    replay_history(target, history[len(have):])
    _set_history(target, history)
    return model


def _weights(directory: str) -> dict[str, torch.Tensor]:
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    bin_file = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(os.path.join(directory, s)).items()}
    raise GrowthError(f"no model.safetensors, pytorch_model.bin or safetensors index in {directory}")


def load_grown(path: str, build: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved by `trainer.save_model(path)` (or a checkpoint folder): `build()` the model as
    first constructed (for a transformers model, `lambda: MyModel(config)` with the original sizes), replay
    the growth history saved there, load the weights. `trainer.save_model()` writes to `args.output_dir`,
    where the callback leaves the history at the end of training; saving a plain nn.Module elsewhere, call
    `save_history(model, path)` too (a transformers model carries it in its config)."""
    model = prepare_resume(build(), path)
    state = _weights(path)
    if not growth_history(model):  # no history saved there: width growth still rebuilds from the shapes
        resize_to_shapes(model, {k: list(v.shape) for k, v in state.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing and hasattr(model, "tie_weights"):  # save_pretrained leaves tied copies out
        model.tie_weights()
        sd = model.state_dict()
        loaded = {sd[k].data_ptr() for k in sd if k not in missing}
        missing = [k for k in missing if sd[k].data_ptr() not in loaded]
    if unexpected or missing:
        raise GrowthError(f"{path}: the weights do not fit the rebuilt model (missing {list(missing)[:5]}, unexpected "
                          f"{list(unexpected)[:5]}); pass as build the constructor of the model that was trained")
    return model
