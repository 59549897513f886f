"""One growth decision from sharded growth data: 2 gloo ranks, each with half of every growth batch,
against one process with the whole batches (CPU, ranks forked from the test process).

Firefly reduces through `collective.current_sync()` (candidate gradients in step one, step-two scores,
the safeguard's held-out losses, BatchNorm statistics). Without BatchNorm the union of the shards is
exactly the single process's data, so the scores, the chosen units and the grown weights must agree
with it up to float summation order; with BatchNorm (each rank normalises its own shard, as DDP does
without SyncBatchNorm) the ranks must still agree with each other bit for bit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from firefly_descent.collective import GrowthSync, current_sync, plan_digest, sync_growth
from firefly_descent.engine import growth_history

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform != "linux", reason="needs torch.distributed and fork"
)

WORLD = 2
# scores are gradients of a mean loss (magnitudes ~1e-2..1); 1 and 2 ranks differ in summation order only
SCORE_ATOL = 1e-6
WEIGHT_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip


def _batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """16 global batches of 32 (step one 10, scores 2, the safeguard's check 4)."""
    g = torch.Generator().manual_seed(1)
    shape = (32, 2, 6, 6) if kind == "conv" else (32, 10)
    out = []
    for _ in range(16):
        x = torch.randn(*shape, generator=g)
        y = (x.flatten(1)[:, :3].sum(1) > 0).long() + (x.flatten(1)[:, 3] > 1).long()
        out.append((x, y))
    return out


KINDS = ("mlp", "conv", "splitting-exact", "splitting-fast", "gradmax", "random", "net2net")
SCORED = ("mlp", "splitting-exact", "splitting-fast", "gradmax")  # the others draw units with a seeded generator


def _grower(kind: str) -> Any:
    from firefly_descent.methods import make_grower

    if kind.startswith("splitting"):  # splitting matrices S_i (exact) or products S_i v (fast), reduced
        return make_grower(kind, budget=0.5, batches=8)
    if kind == "gradmax":  # its gradient-correlation matrix M, reduced
        return make_grower(kind, budget=0.5, batches=4)
    if kind in ("random", "net2net"):  # data only through the safeguard's losses and the reported ones
        return make_grower(kind, budget=0.5, batches=4)
    if kind == "mlp":  # sample_size 16 of each global batch of 32: 8 per rank, shared out by GrowthSync.share
        return make_grower("firefly", budget=0.5, sample_size=16)
    return make_grower("firefly", budget=0.5, candidates="all", depth_after=["2"], sample_size=None)


def _grow(kind: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Grow once; return what decides the step and what it produced."""
    model = _convnet() if kind == "conv" else _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grower = _grower(kind)
    example = batches[0][0][:4]
    report = grower.grow(model, iter(batches), nn.functional.cross_entropy, optimizer=opt, example_inputs=example)
    if hasattr(grower, "last_scores"):
        scores = [(c.kind, c.group, c.index, c.score) for c in grower.last_scores]
    elif "min_eigenvalues" in report.extra:
        scores = [("min-eigenvalue", n, 0, v) for n, v in sorted(report.extra["min_eigenvalues"].items())]
    elif "singular_values" in report.extra:
        scores = [("singular-value", n, k, v) for n, s in sorted(report.extra["singular_values"].items())
                  for k, v in enumerate(s)]
    else:
        scores = []
    return {
        "scores": scores,
        "predicted": report.predicted_loss_change,
        "split": report.units_split,
        "added": report.units_added,
        "layers": report.layers_inserted,
        "loss_before": report.loss_before,
        "loss_after": report.loss_after,
        "outcome": report.outcome,
        "heldout_before": report.safety.heldout_before,
        "heldout_after": report.safety.heldout_after,
        "digest": plan_digest(growth_history(model)),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _rank_main(rank: int, port: int, side: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1"}
        | {"MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": str(WORLD)}
    )
    torch.set_num_threads(1)
    from firefly_descent.train.distributed import DistributedRuntime, RankSync

    rt = DistributedRuntime("cpu")
    try:
        for kind in KINDS:
            shard = [(x[rank::WORLD], y[rank::WORLD]) for x, y in _batches(kind)]  # a different half on each rank
            with sync_growth(RankSync(rt)):
                assert current_sync().active and current_sync().share(16) == 8
                out = _grow(kind, shard)
            torch.save(out, Path(side, f"{kind}-rank{rank}.pt"))
    finally:
        rt.close()


def _fork(target: Any, *args: Any) -> list[int | None]:
    ctx, port = mp.get_context("fork"), _free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    side = tmp_path_factory.mktemp("sharded")
    from firefly_descent.methods import make_grower  # noqa: F401 - import once in the parent, ranks fork

    assert _fork(_rank_main, str(side)) == [0] * WORLD
    return side


def test_the_single_process_hook_is_the_identity() -> None:
    s = current_sync()
    assert type(s) is GrowthSync and not s.active and s.share(16) == 16 and s.share(None) is None
    t = torch.randn(3)
    assert s.mean(t, 5.0) is t and s.sum(t) is t and s.sum_floats(2.0, 3) == (2.0, 3.0)
    grads = {"a": t}
    assert s.mean_dict(grads, 1.0) is grads


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "conv"])
def test_sharded_decision_equals_one_process_on_the_union(sharded: Path, kind: str) -> None:
    ranks = [torch.load(sharded / f"{kind}-rank{r}.pt") for r in range(WORLD)]
    one = _grow(kind, _batches(kind))
    # every rank computed the same scores, plan and weights, bit for bit (no broadcast of results here)
    for other in ranks[1:]:
        assert other["scores"] == ranks[0]["scores"] and other["digest"] == ranks[0]["digest"]
        assert all(torch.equal(other["state"][k], v) for k, v in ranks[0]["state"].items())
    two = ranks[0]
    # ... and the same decision as one process on the whole batches
    assert [s[:3] for s in two["scores"]] == [s[:3] for s in one["scores"]]
    assert len(one["scores"]) > 0 or kind not in SCORED
    worst = max((abs(a[3] - b[3]) for a, b in zip(two["scores"], one["scores"])), default=0.0)
    print(f"max |score difference| {worst:.3g} over {len(one['scores'])} candidates (tolerance {SCORE_ATOL})")
    assert worst <= SCORE_ATOL
    if one["predicted"] is None:
        assert two["predicted"] is None
    else:
        assert two["predicted"] == pytest.approx(one["predicted"], abs=SCORE_ATOL)
    assert (two["split"], two["added"]) == (one["split"], one["added"])
    assert sum(one["split"].values()) + sum(one["added"].values()) > 0  # it grew
    assert two["outcome"] == one["outcome"] == "accepted"
    for k in ("train", "eval"):  # the safeguard's held-out losses are over the union of the shards
        assert two["heldout_before"][k] == pytest.approx(one["heldout_before"][k], abs=1e-6)
        assert two["heldout_after"][k] == pytest.approx(one["heldout_after"][k], abs=1e-6)
    assert two["loss_before"] == pytest.approx(one["loss_before"], abs=1e-6)
    assert two["state"].keys() == one["state"].keys()
    diff = max((two["state"][k] - one["state"][k]).abs().max().item() for k in one["state"])
    print(f"max |grown weight difference| {diff:.3g} (tolerance {WEIGHT_ATOL})")
    assert diff <= WEIGHT_ATOL


def test_batchnorm_and_depth_candidates_agree_across_ranks(sharded: Path) -> None:
    r0, r1 = (torch.load(sharded / f"conv-rank{r}.pt") for r in range(WORLD))
    assert r0["scores"] == r1["scores"] and r0["digest"] == r1["digest"]
    assert {s[0] for s in r0["scores"]} >= {"split", "new", "layer"}
    assert r0["heldout_before"] == r1["heldout_before"] and r0["outcome"] == r1["outcome"]
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # incl. BatchNorm statistics


class _Unreduced:
    """A sharded grower that decides from its own rank alone (here: its rank), or fails on rank 1 only."""

    sharded_growth = True

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def grow(self, model: nn.Module, data: Any, loss_fn: Any, optimizer: Any = None, example_inputs: Any = None):
        from firefly_descent.engine import widen
        from firefly_descent.errors import GrowthError

        rank = current_sync().rank
        if self.fail and rank == 1:
            raise GrowthError("nothing to grow on this shard (test)")
        widen(model, example_inputs, {"0": 1 + rank}, optimizer=optimizer)
        return {"method": "unreduced"}


def _mismatch_main(rank: int, port: int, side: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1"}
        | {"MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": str(WORLD)}
    )
    torch.set_num_threads(1)
    from firefly_descent.train.distributed import DistributedRuntime

    rt = DistributedRuntime("cpu")
    xs = torch.randn(64, 10)
    rt._full_train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, xs[:, 0].long()))
    rt._batch_size = 32
    try:
        for fail in (False, True):
            try:
                rt.grow(_Unreduced(fail), _mlp(), None, nn.functional.cross_entropy, None, xs[:4])
            except Exception as e:
                Path(side, f"{'fail' if fail else 'plan'}{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        rt.close()


def test_different_plans_or_one_failing_rank_stop_every_rank_with_one_line(tmp_path: Path) -> None:
    from firefly_descent.analysis import analyze

    assert "0" in analyze(_mlp(), torch.randn(2, 10)).groups  # the group the test grower widens
    assert _fork(_mismatch_main, str(tmp_path)) == [0] * WORLD
    plan = [(tmp_path / f"plan{r}.txt").read_text() for r in range(WORLD)]
    assert plan[0] == plan[1] and "\n" not in plan[0]
    assert plan[0].startswith("PlanMismatchError: growth after plan 0: the ranks computed different growth plans")
    fail = [(tmp_path / f"fail{r}.txt").read_text() for r in range(WORLD)]
    assert fail[1] == "GrowthError: nothing to grow on this shard (test)"
    assert fail[0] == (
        "GrowthError: rank 1 could not grow, so rank 0 stops too (GrowthError: nothing to grow on this shard (test))"
    )
