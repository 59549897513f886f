"""Growth under torch.distributed on CPU (gloo): 2 ranks against 1, one growth, kill and resume.

Ranks are forked from the test process (torch is already imported, so a rank starts in well under a
second) with the environment torchrun would give them; the training code cannot tell the difference.
The CLI's own launcher (`firefly train --nproc`, torch.distributed.run) is tested for its refusals here
and end to end in test_distributed_cli (slow: it starts fresh interpreters).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from firefly_descent.train.checkpoint import list_checkpoints, load_checkpoint, rebuild_model
from firefly_descent.train.distributed import architecture_hash

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform != "linux", reason="needs torch.distributed and fork"
)

# Same global batch (64) and seed for every world size; 512 training examples = 8 full global batches.
CFG = {
    "name": "dist",
    "data": {"name": "digits", "batch_size": 64, "train_subset": 512, "test_subset": 200, "augment": None},
    "model": {"name": "mlp", "kwargs": {"hidden": [8, 8]}},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"name": "cosine", "restart_after_growth": True},
    "growth": {"method": "firefly", "kwargs": {"budget": 0.35}, "at": [2], "data_batches": 4},
    "train": {"epochs": 4, "seed": 0, "device": "cpu", "tensorboard": False},
    "checkpoint": {"keep_last": 20},
}
# 1 vs 2 processes differ only in float summation order (gradient all-reduce, sharded metric sums)
ATOL_AFTER_GROWTH = 1e-6
ATOL_FINAL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder:
    """Each rank writes its architecture hash after every growth; one rank may kill itself."""

    def __init__(self, out: Path, rank: int, die_after_epoch: int | None) -> None:
        self.out, self.rank, self.die = out, rank, die_after_epoch

    def on_growth(self, record: dict, model: torch.nn.Module) -> None:
        path = self.out / f"hash-rank{self.rank}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"index": record["index"], "hash": architecture_hash(model)}) + "\n")

    def on_epoch_end(self, row: dict, model: torch.nn.Module) -> None:
        if self.die is not None and row["epoch"] == self.die:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash, no cleanup


def _register_failing_grower() -> None:
    """A grower that refuses to grow (registered in the forked ranks only)."""
    from firefly_descent.errors import GrowthError
    from firefly_descent.methods.base import Grower, register_grower

    class Failing(Grower):
        name = "test-fails"

        def grow(self, model, data, loss_fn, optimizer=None, example_inputs=None):  # type: ignore[override]
            raise GrowthError("no candidate fits the budget (test)")

    register_grower("test-fails")(Failing)


def _rank_main(
    rank: int, world: int, port: int, run_dir: str, side: str, resume: bool, die: int | None, cfg: dict
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from firefly_descent.train import resume as resume_run
    from firefly_descent.train import train

    if cfg["growth"]["method"] == "test-fails":
        _register_failing_grower()
    cb = [_Recorder(Path(side), rank, die if rank == 1 else None)]
    try:
        if resume:
            resume_run(run_dir, progress=False, callbacks=cb)
        else:
            train(cfg, run_dir, progress=False, callbacks=cb)
    except Exception as e:
        Path(side, f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise


def _warm_imports() -> None:
    """Import what every rank needs once in the parent, so forked ranks start at once."""
    import torch._dynamo  # noqa: F401 - torch.optim imports it lazily (seconds)

    from firefly_descent.data import load_dataset
    from firefly_descent.methods import make_grower  # noqa: F401

    load_dataset("digits", augment=None)


def _launch(
    world: int, run_dir: Path, side: Path, resume: bool = False, die: int | None = None, cfg: dict = CFG
) -> list[int]:
    """Fork `world` ranks; if one dies, kill the rest (as torchrun's agent does). Returns exit codes."""
    _warm_imports()
    side.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    port = _free_port()
    args = (world, port, str(run_dir), str(side), resume, die, cfg)
    procs = [ctx.Process(target=_rank_main, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + 240
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in procs]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model_state"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    assert list(a) == list(b)
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    print(f"max |weight difference| {worst:.3g} (tolerance {atol})")
    assert worst <= atol, f"weights differ by {worst:.3g} > {atol}"
    return worst


def _growth_ckpt(run_dir: Path) -> Path:
    return next(p for p in list_checkpoints(run_dir) if p.stem.endswith("g"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, world in (("one", 1), ("two", 2)):
        codes = _launch(world, root / name, root / f"{name}-side")
        assert codes == [0] * world, f"{name}: exit codes {codes}"
        out[name] = root / name
        out[name + "-side"] = root / f"{name}-side"
    return out


def test_two_ranks_match_one_process_through_growth(runs: dict[str, Path]) -> None:
    one, two = runs["one"], runs["two"]
    g1, g2 = _growth_ckpt(one), _growth_ckpt(two)
    c1, c2 = load_checkpoint(g1), load_checkpoint(g2)
    assert c1["growth_history"] == c2["growth_history"] and len(c1["growth_history"]) >= 1
    assert c1["growth_reports"][0]["params_after"] > c1["growth_reports"][0]["params_before"]
    # Firefly decided on both ranks' shards of the growth batches, statistics reduced (collective.py)
    assert [c["growth_reports"][0]["extra"]["growth_shards"] for c in (c1, c2)] == [1, 2]
    assert rebuild_model(c1).state_dict().keys() == rebuild_model(c2).state_dict().keys()
    _assert_close(c1["model_state"], c2["model_state"], ATOL_AFTER_GROWTH)
    # two more epochs of DDP training on the grown model (DDP rebuilt around the new parameters)
    f1, f2 = list_checkpoints(one)[-1], list_checkpoints(two)[-1]
    assert load_checkpoint(f2)["epoch"] == 4
    _assert_close(_state(f1), _state(f2), ATOL_FINAL)
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in m2] == [1, 2, 3, 4]  # rank 0 alone wrote the metrics, once per epoch
    for r1, r2 in zip(m1, m2):  # metrics are reduced over ranks: the same numbers as one process
        assert r1["test_acc"] == pytest.approx(r2["test_acc"], abs=1e-9)
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], abs=1e-5)
    assert m2[-1]["train_loss"] < m2[0]["train_loss"]


def test_both_ranks_hold_the_same_architecture_after_growth(runs: dict[str, Path]) -> None:
    side = runs["two-side"]
    h0 = (side / "hash-rank0.jsonl").read_text().splitlines()
    h1 = (side / "hash-rank1.jsonl").read_text().splitlines()
    assert len(h0) == 1 and h0 == h1
    one = (runs["one-side"] / "hash-rank0.jsonl").read_text().splitlines()
    assert one == h0  # and the same as the single-process run's


def test_kill_one_rank_then_resume_with_another_process_count(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    codes = _launch(2, run_dir, tmp_path / "side", die=3)  # rank 1 dies after epoch 3, after the growth
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    done = [load_checkpoint(p)["epoch"] for p in list_checkpoints(run_dir)]
    assert done and max(done) < 4  # the run did not finish
    codes = _launch(1, run_dir, tmp_path / "side-resume", resume=True)  # 1 process now
    assert codes == [0]
    for p in list_checkpoints(run_dir):  # every checkpoint on disk is complete and loadable
        load_checkpoint(p)
    assert not list((run_dir / "checkpoints").glob("*.tmp*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["num_growths"] == 1
    # the same result as the uninterrupted 2-process run, up to 1-vs-2 process summation order
    final = list_checkpoints(run_dir)[-1]
    ref = list_checkpoints(runs["two"])[-1]
    assert load_checkpoint(final)["growth_history"] == load_checkpoint(ref)["growth_history"]
    _assert_close(_state(final), _state(ref), ATOL_FINAL)


def test_nproc_refuses_a_batch_that_does_not_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from firefly_descent.cli import main

    code = main(["train", "digits-mlp-firefly", "--nproc", "3", "--out", str(tmp_path / "x")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: data.batch_size: the global batch 64 is not divisible by --nproc 3; use a multiple of 3"
    ]
    assert not (tmp_path / "x").exists()  # refused before any process was started


def _mismatch_main(rank: int, port: int, side: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        | {"MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": "2"}
    )
    from firefly_descent.train.distributed import ArchitectureMismatchError, DistributedRuntime

    rt = DistributedRuntime("cpu")
    try:
        same = torch.nn.Linear(4, 3)
        rt.check_architecture(same, None, "start")  # equal architectures pass
        grown = torch.nn.Linear(4, 3 + rank)  # rank 1 "applied another plan"
        try:
            rt.check_architecture(grown, None, "growth 1")
        except ArchitectureMismatchError as e:
            Path(side, f"err{rank}.txt").write_text(str(e))
    finally:
        rt.close()


def test_architecture_mismatch_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert architecture_hash(a) == architecture_hash(b)  # values do not matter, shapes do
    assert architecture_hash(a) != architecture_hash(torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    before = architecture_hash(a, opt)
    a(torch.randn(2, 4)).sum().backward()
    opt.step()  # momentum buffers now exist: the optimizer layout is part of the hash
    assert architecture_hash(a, opt) != before
    ctx, port = mp.get_context("fork"), _free_port()
    procs = [ctx.Process(target=_mismatch_main, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    msgs = [(tmp_path / f"err{r}.txt").read_text() for r in range(2)]
    assert msgs[0] == msgs[1] and "\n" not in msgs[0]
    assert msgs[0].startswith("growth 1: the architecture differs across ranks (rank 0 ")



def test_a_growth_failure_on_rank_0_stops_every_rank(tmp_path: Path) -> None:
    cfg = {**CFG, "growth": {**CFG["growth"], "method": "test-fails", "kwargs": {}}}
    codes = _launch(2, tmp_path / "run", tmp_path / "side", cfg=cfg)
    assert codes == [1, 1]  # both stop (no rank waits forever for a plan)
    e0 = (tmp_path / "side" / "error-rank0.txt").read_text()
    e1 = (tmp_path / "side" / "error-rank1.txt").read_text()
    assert e0 == "GrowthError: no candidate fits the budget (test)"
    assert e1 == (
        "GrowthError: rank 0 could not grow, so rank 1 stops too (GrowthError: no candidate fits the budget (test))"
    )
    assert max(load_checkpoint(p)["epoch"] for p in list_checkpoints(tmp_path / "run")) == 2  # kept
