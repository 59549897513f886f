"""Growth under torch.distributed: DDP training, one growth decision, the same plan on every rank.

A rank of a torchrun job (``firefly train CONFIG --nproc N``, or ``torchrun ... -m firefly_descent.cli
train``) runs the ordinary loop with a `DistributedRuntime`:

* **Backend.** gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).
* **Data.** The configured ``data.batch_size`` is the *global* batch: each rank trains on
  ``batch_size / world`` examples per step from a `DistributedSampler` (``set_epoch`` every epoch),
  so the union of the ranks' batches at step k is the k-th batch of one permutation that depends
  only on the seed and the epoch, whatever the number of processes. Evaluation sets are split
  into disjoint shards and the sums are all-reduced.
* **Growth.** The growth batches are drawn from the whole training set with the global batch size
  and a seed fixed by the seed and the growth's position in the history: the same batches for 1 or
  N processes. A grower with ``sharded_growth = True`` (Firefly, splitting, GradMax, ...) runs on every
  rank, each on its strided slice of every global batch, with rank 0's RNG state, and reduces its
  statistics through `collective.current_sync()` (`RankSync`, train/sync.py: candidate gradients, scores,
  held-out losses, BatchNorm statistics); every rank computes the same plan, which a digest of the
  plan records all-gathered across ranks checks (`PlanMismatchError`, train/hashing.py). Any other grower runs on
  rank 0 alone on the whole global batches; rank 0 broadcasts the plans it applied (pure data, the
  engine's growth-history records) and every other rank applies them through the same engine,
  remapping its optimizer. An architecture hash (module types, tensor names, shapes
  and dtypes, optimizer state layout) is all-gathered and compared; a mismatch stops the run with one
  error. Then rank 0's weights, buffers and optimizer state are broadcast, new BatchNorm channels are
  calibrated on every rank's shard with the statistics all-reduced (`calibrate_new_batchnorm`'s
  ``reduce``), refreshed running statistics are averaged, and DDP is rebuilt around the grown module
  (and recompiled, with ``train.compile``) before the next step.
* **Files.** Only rank 0 writes logs, metrics and atomic checkpoints. A checkpoint holds no rank
  count, so ``firefly resume`` continues with the same or a different number of processes.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..analysis.rules import batchnorms
from ..collective import plan_digest, sync_growth
from ..engine.apply import apply, growth_history
from ..errors import GrowthError
from ..plan import Plan
from .config import ConfigError
from .device import DeviceLoader
from .hashing import ArchitectureMismatchError, PlanMismatchError, architecture_hash
from .precision import compile_module
from .runtime import Runtime, under_torchrun
from .sync import ProcessGroup, RankSync

__all__ = [
    "ArchitectureMismatchError",
    "DistributedRuntime",
    "PlanMismatchError",
    "RankSync",
    "architecture_hash",
    "runtime_for",
]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _optimizer_layout(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[list[str]] | None:
    """Parameter names per param group (parameters the model no longer holds are skipped)."""
    if optimizer is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"] if id(p) in names] for g in optimizer.param_groups]


def _set_optimizer_layout(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: list[list[str]] | None
) -> None:
    """Give the optimizer rank 0's param-group membership (where the grower registered new parameters)."""
    if optimizer is None or layout is None:
        return
    named = dict(model.named_parameters())
    missing = [n for names in layout for n in names if n not in named]
    if missing:
        raise ArchitectureMismatchError(
            f"after growth, rank 0's optimizer holds {missing[0]!r}, which this rank's model does not have"
        )
    for group, names in zip(optimizer.param_groups, layout):
        group["params"] = [named[n] for n in names]
    for names in layout[len(optimizer.param_groups) :]:
        optimizer.add_param_group({"params": [named[n] for n in names]})


def _strided(batch: Any, rank: int, world: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[rank::world]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_strided(b, rank, world) for b in batch)
    return batch


class _ShardBatches:
    """This rank's strided slice ``[rank::world]`` of every global batch of `loader`. The slices partition
    each batch, and the first k samples of every slice are together its first k·world samples, so a
    sample cap shared out by `GrowthSync.share` reads what one process reads."""

    def __init__(self, loader: Any, rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield _strided(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.loader)


class DistributedRuntime(Runtime):
    """One rank of a torch.distributed job (see the module docstring for what is synchronised)."""

    distributed = True

    def __init__(self, device_name: str = "auto") -> None:
        super().__init__()
        self.local_rank = _env_int("LOCAL_RANK", 0)
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {device_name!r} requested but CUDA is not available; use auto or cpu")
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        self.backend = dist.get_backend()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        self.group = ProcessGroup(self.comm_device)
        self._full_train: Any = None
        self._full_val: Any = None
        self._sampler: DistributedSampler | None = None
        self._batch_size = 0
        self._num_workers = 0
        self._seed = 0

    # ---- setup

    def _configure(self, setup: Any) -> None:
        """Put the model on this rank's device and replace the loaders by per-rank shards."""
        if setup.device.type == "cuda":
            setup.device = torch.device("cuda", torch.cuda.current_device())
            setup.model.to(setup.device)
            setup.example_inputs = setup.example_inputs.to(setup.device)
        elif self.backend == "nccl":
            raise ConfigError(f"train.device: {setup.device} cannot use the nccl process group; use auto or cuda")
        super()._configure(setup)
        d, world = setup.cfg.data, self.world_size
        if d.batch_size % world:
            raise ConfigError(
                f"data.batch_size: the global batch {d.batch_size} is not divisible by the {world} processes; "
                f"use a multiple of {world}"
            )
        self._batch_size, self._num_workers, self._seed = d.batch_size, d.num_workers, setup.cfg.train.seed
        self._full_train, self._full_val = setup.train_loader, setup.val_loader
        bundle = setup.bundle
        self._sampler = DistributedSampler(
            bundle.train, num_replicas=world, rank=self.rank, shuffle=True, seed=self._seed, drop_last=False
        )
        common = {"num_workers": d.num_workers, "persistent_workers": d.num_workers > 0}
        setup.train_loader = DataLoader(bundle.train, batch_size=d.batch_size // world, sampler=self._sampler, **common)
        eval_bs = d.eval_batch_size or d.batch_size
        if setup.val_loader is not None:
            setup.val_loader = DataLoader(self._shard(bundle.val), batch_size=eval_bs, **common)
        setup.test_loader = DataLoader(self._shard(bundle.test), batch_size=eval_bs, **common)

    def _shard(self, dataset: Any) -> Subset:
        """Disjoint strided shard (no padding, so the all-reduced sums cover each example once)."""
        return Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))

    def set_epoch(self, epoch: int) -> None:
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)

    # ---- forward module

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the (grown) module, then torch.compile if asked."""
        gc.collect()  # the previous DDP wrapper's reducer releases its hooks on shared parameters
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (BatchNorm statistics) follow rank 0 on every forward
        ddp = DistributedDataParallel(model, device_ids=ids)
        if self.compile:
            self.compiles += 1
            return compile_module(ddp, self.compile_backend, self.example)
        return ddp

    # ---- collectives

    def reduce_sums(self, *values: float) -> tuple[float, ...]:
        return self.group.reduce_sums(*values)

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.group.all_reduce(t)

    def sync_buffers(self, model: nn.Module) -> None:
        with torch.no_grad():
            for m in batchnorms(model, tracking=True):
                for buf in (m.running_mean, m.running_var):
                    buf.copy_(self.group.all_reduce(buf.detach().clone()) / self.world_size)

    def barrier(self) -> None:
        dist.barrier()

    def agree(self, value: Any) -> Any:
        return self.group.agree(value)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, task: str, amp: Any) -> dict[str, Any]:
        res = super().evaluate(model, loader, device, task, amp)
        n = len(loader.dataset) if loader is not None else 0
        loss = (res["loss"] or 0.0) * n
        acc = (res["acc"] or 0.0) * n
        loss, acc, n = self.reduce_sums(loss, acc, n)
        if n == 0:
            return {"loss": None, "acc": None}
        return {"loss": loss / n, "acc": acc / n if task == "classification" else None}

    def check_architecture(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> str:
        """All-gather `architecture_hash` and stop with one line if any rank differs; return the hash."""
        mine = architecture_hash(model, optimizer)
        hashes = self.group.all_gather(mine, self.world_size)
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if bad:
            raise ArchitectureMismatchError(
                f"{when}: the architecture differs across ranks (rank 0 {hashes[0]}, rank {bad[0]} {hashes[bad[0]]}); "
                "the ranks did not apply the same growth plans, so the run stops here (checkpoints are intact)"
            )
        return mine

    def _broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        with torch.no_grad():
            for t in model.state_dict().values():
                self.group.broadcast(t)
            if optimizer is None:
                return
            for group in optimizer.param_groups:
                for p in group["params"]:
                    st = optimizer.state.get(p, {})
                    for k in sorted(st):
                        if isinstance(st[k], torch.Tensor):
                            self.group.broadcast(st[k])

    # ---- growth

    def _growth_loader(self, index: int) -> DataLoader:
        """Global-batch growth batches: same on every world size (seeded by the run seed and `index`)."""
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + index + 1)
        return DataLoader(
            self._full_train.dataset, batch_size=self._batch_size, shuffle=True, generator=gen, num_workers=0
        )

    def _agree_rng(self) -> None:
        """Every rank continues from rank 0's torch RNG state (CPU, and this rank's CUDA device)."""
        cuda = self.device.type == "cuda"
        states = self.agree(
            (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None) if self.is_main else None
        )
        if not self.is_main:
            torch.set_rng_state(states[0])
            if cuda and states[1] is not None:
                torch.cuda.set_rng_state(states[1], self.device)

    def _grow_sharded(
        self,
        grower: Any,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: Any,
        optimizer: torch.optim.Optimizer | None,
        example_inputs: Any,
    ) -> Any:
        """Every rank runs the grower on its shard of the global growth batches, reducing through `RankSync`;
        the plans must come out identical (checked), then weights and state are synced as below."""
        n_before = len(growth_history(model))
        self._agree_rng()
        shard = _ShardBatches(self._growth_loader(n_before), self.rank, self.world_size)
        batches = DeviceLoader(shard, self.device, getattr(data, "max_batches", None))
        report: Any = None
        failure: Exception | None = None
        try:
            with sync_growth(RankSync(self)):
                report = grower.grow(model, batches, loss_fn, optimizer=optimizer, example_inputs=example_inputs)
        except Exception as e:  # every rank learns of it below (a rank that fails mid-collective takes the job down)
            failure = e
        mine = {
            "error": None if failure is None else f"{type(failure).__name__}: {' '.join(str(failure).split())}",
            "plans": plan_digest(growth_history(model)[n_before:]),
        }
        every = self.group.all_gather(mine, self.world_size)
        if failure is not None:
            raise failure
        bad = next((r for r, m in enumerate(every) if m["error"]), None)
        if bad is not None:
            raise GrowthError(f"rank {bad} could not grow, so rank {self.rank} stops too ({every[bad]['error']})")
        differ = [r for r, m in enumerate(every) if m["plans"] != every[0]["plans"]]
        if differ:
            raise PlanMismatchError(
                f"growth after plan {n_before}: the ranks computed different growth plans from their shards "
                f"(rank 0 {every[0]['plans']}, rank {differ[0]} {every[differ[0]]['plans']}); the grower reduces "
                "some statistic without collective.current_sync(), so the run stops here (checkpoints are intact)"
            )
        self.check_architecture(model, optimizer, f"growth after plan {n_before}")
        self._broadcast_state(model, optimizer)
        if isinstance(getattr(report, "extra", None), dict):
            report.extra["growth_shards"] = self.world_size  # decided on every rank's shard, reduced
        return report

    def grow(
        self,
        grower: Any,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: Any,
        optimizer: torch.optim.Optimizer | None = None,
        example_inputs: Any = None,
    ) -> Any:
        """Sharded growers: every rank decides on its shard with reduced statistics (`_grow_sharded`).
        Others: rank 0 decides and applies; the others apply the same plans; then weights and state are synced."""
        if getattr(grower, "sharded_growth", False) and not getattr(grower, "needs_validation", False):
            return self._grow_sharded(grower, model, data, loss_fn, optimizer, example_inputs)
        n_before = len(growth_history(model))
        message: dict[str, Any]
        report: Any = None
        if self.is_main:
            try:
                if getattr(grower, "needs_validation", False) and self._full_val is not None:
                    grower.val_data = DeviceLoader(self._full_val, self.device)
                batches = DeviceLoader(self._growth_loader(n_before), self.device, getattr(data, "max_batches", None))
                report = grower.grow(model, batches, loss_fn, optimizer=optimizer, example_inputs=example_inputs)
                rec = report.to_dict() if hasattr(report, "to_dict") else dict(report)
                message = {
                    "history": growth_history(model)[n_before:],
                    "report": rec,
                    "optimizer_layout": _optimizer_layout(model, optimizer),
                }
            except BaseException as e:
                self.agree({"error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
                raise
            self.agree(message)
        else:
            message = self.agree(None)
            if "error" in message:
                raise GrowthError(f"rank 0 could not grow, so rank {self.rank} stops too ({message['error']})")
            for record in message["history"]:
                apply(model, Plan.from_dict(record), optimizer, verify=False)
            _set_optimizer_layout(model, optimizer, message["optimizer_layout"])
            report = message["report"]
        self.check_architecture(model, optimizer, f"growth after plan {n_before}")
        self._broadcast_state(model, optimizer)
        return report

    def close(self) -> None:
        self._fwd = None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()



def runtime_for(device_name: str) -> Runtime:
    """A `DistributedRuntime` inside a torchrun job (or an initialised process group), else `Runtime`."""
    dist_ready = dist.is_available() and dist.is_initialized()
    if dist_ready or under_torchrun():
        return DistributedRuntime(device_name)
    return Runtime()
