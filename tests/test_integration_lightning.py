"""FireflyCallback under Lightning: exact resume after growth, every parameter trained, identical DDP ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from firefly_descent.engine import growth_history  # noqa: E402
from firefly_descent.integrations.lightning import (  # noqa: E402
    CHECKPOINT_KEY,
    FireflyCallback,
    default_batch,
    load_grown,
)
from firefly_descent.train.hashing import architecture_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Net(L.LightningModule):
    """A tiny MLP; Adam in two param groups (decay on weights only) with a step LR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):  # noqa: ANN201
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.Adam([{"params": decay, "weight_decay": 1e-3}, {"params": rest}], lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=32)


def trainer(max_epochs: int, callbacks: list, **kw) -> L.Trainer:  # noqa: ANN003
    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **kw,
    )


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(("candidates", "resume_epoch"), [("width", 2), ("depth", 2), ("width", 1)])
def test_resume_from_a_checkpoint_after_growth_is_exact(tmp_path: Path, candidates: str, resume_epoch: int) -> None:
    """Resume from the checkpoint of epoch 3 (after the first growth; the second one is the resumed run's), or of
    epoch 2 (written before the growth that follows it: the resumed run does both)."""
    # run A: grows after epochs 2 and 3, checkpoints every epoch
    L.seed_everything(0, verbose=False)
    a = Net()
    p0 = n_params(a)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    grow = FireflyCallback("firefly", at=[2, 3], loss_fn=F.cross_entropy, candidates=candidates)
    ta = trainer(4, [grow, ckpt])
    ta.fit(a, loader(), loader())  # with validation: checkpoints are written at validation end
    assert len(growth_history(a)) >= 1 and n_params(a) > p0
    if candidates == "depth":  # new layers: their parameters join the optimizer after the old ones
        assert any(r.layers_inserted for r in grow.reports)
    # growth after epoch E runs as epoch E + 1 starts: the checkpoint of epoch 3 holds the first growth only
    saved = torch.load(tmp_path / "epoch=2.ckpt", weights_only=False)
    assert len(saved[CHECKPOINT_KEY]["history"]) == 1
    # run B: a fresh module (other init seed) resumed mid-run from that checkpoint grows once more itself
    L.seed_everything(123, verbose=False)
    b = Net()
    cb = FireflyCallback("firefly", at=[2, 3], loss_fn=F.cross_entropy, candidates=candidates)
    tb = trainer(4, [cb], enable_checkpointing=False)
    tb.fit(b, loader(), loader(), ckpt_path=str(tmp_path / f"epoch={resume_epoch}.ckpt"))
    assert cb.grown_after == [2, 3] and len(cb.reports) == 3 - resume_epoch
    assert architecture_hash(a, ta.optimizers[0]) == architecture_hash(b, tb.optimizers[0])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = ta.optimizers[0], tb.optimizers[0]
    assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups] == [2.5e-3, 2.5e-3]
    for ga, gb in zip(oa.param_groups, ob.param_groups):
        for pa, pb in zip(ga["params"], gb["params"]):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(oa.state[pa][key], ob.state[pb][key])
    # outside a trainer, the grown module comes back from the last checkpoint
    c = load_grown(Net(), str(tmp_path / "epoch=3.ckpt"))
    assert all(torch.equal(v, sa[k]) for k, v in c.state_dict().items())


class _GradProbe(Callback):
    """After every backward: parameters outside the optimizer, and parameters without a gradient."""

    def __init__(self) -> None:
        self.outside: list[str] = []
        self.no_grad: list[str] = []
        self.steps_after_growth = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        held = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        named = list(pl_module.named_parameters())
        self.outside += [n for n, p in named if id(p) not in held]
        self.no_grad += [n for n, p in named if p.grad is None or not p.grad.abs().sum() > 0]
        if growth_history(pl_module):
            self.steps_after_growth += 1


def test_every_parameter_is_optimized_and_gets_a_gradient_after_growth() -> None:
    L.seed_everything(0, verbose=False)
    m = Net()
    sizes0 = [p.shape for p in m.parameters()]
    probe = _GradProbe()
    logged: list[dict[str, float]] = []

    class _Logger(L.loggers.logger.DummyLogger):
        def log_metrics(self, metrics, step=None):  # noqa: ANN001, ANN201
            logged.append(dict(metrics))

    grow = FireflyCallback("firefly", every=1, loss_fn=F.cross_entropy)
    t = L.Trainer(max_epochs=3, accelerator="cpu", callbacks=[grow, probe], logger=_Logger(),
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t.fit(m, loader())
    assert grow.grown_after == [1, 2]
    assert [p.shape for p in m.parameters()] != sizes0
    assert probe.steps_after_growth == 12  # 6 batches in each epoch after the first growth
    assert probe.outside == [] and probe.no_grad == []
    (opt,) = t.optimizers
    weights = {id(p) for n, p in m.named_parameters() if n.endswith("weight")}
    assert {id(p) for p in opt.param_groups[0]["params"]} == weights  # new weights joined their neighbours' group
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    reports = [r for r in logged if "firefly/params_after" in r]
    assert [r["firefly/epoch"] for r in reports] == [1.0, 2.0]
    assert reports[-1]["firefly/params_after"] == n_params(m) > reports[0]["firefly/params_before"]


class _TwoOptimizers(Net):
    """Manual optimization with two optimizers (body, head): each keeps its own state through growth."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        opts = self.optimizers()
        loss = F.cross_entropy(self(x), y)
        for o in opts:
            o.zero_grad()
        self.manual_backward(loss)
        for o in opts:
            o.step()
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        body = list(self.net[:4].parameters())
        return torch.optim.Adam(body, lr=1e-2), torch.optim.SGD(self.net[4].parameters(), lr=0.1, momentum=0.9)


class _Snapshot(Callback):
    """Each optimizer's state as epoch 2 starts (when growth after epoch 1 runs): placed before FireflyCallback it
    sees the state before growth, after it the state after."""

    def __init__(self) -> None:
        self.state: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            self.state = [
                {n: {k: v.clone() for k, v in o.state[p].items()} for g in o.param_groups for p in g["params"]
                 for n in [names[id(p)]]}
                for o in trainer.optimizers
            ]


def test_two_optimizers_each_keep_their_parameters_and_state() -> None:
    L.seed_everything(0, verbose=False)
    m = _TwoOptimizers()
    before, after = _Snapshot(), _Snapshot()
    grow = FireflyCallback("firefly", at=[1], loss_fn=F.cross_entropy)
    t = trainer(2, [before, grow, after], enable_checkpointing=False, limit_train_batches=2)
    t.fit(m, loader())
    body, head = t.optimizers
    assert {id(p) for g in body.param_groups for p in g["params"]} == {id(p) for p in m.net[:4].parameters()}
    assert {id(p) for g in head.param_groups for p in g["params"]} == {id(p) for p in m.net[4].parameters()}
    assert m.net[2].out_features > 6  # the head's input grew
    (b_body, b_head), (a_body, a_head) = before.state, after.state
    assert a_body.keys() == b_body.keys() and a_head.keys() == b_head.keys()
    for name, st in a_body.items():  # Adam: step counts kept, old entries at their place
        assert torch.equal(st["step"], b_body[name]["step"]) and st["step"].item() == 2
    old = b_head["net.4.weight"]["momentum_buffer"]
    new = a_head["net.4.weight"]["momentum_buffer"]
    assert new.shape == (3, m.net[2].out_features)
    assert torch.equal(a_head["net.4.bias"]["momentum_buffer"], b_head["net.4.bias"]["momentum_buffer"])
    assert torch.equal(new.abs().sum(), old.abs().sum()) or torch.allclose(new.abs().sum(), old.abs().sum())


def test_ddp_two_cpu_processes_grow_identically(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning_ddp_script.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["grown_after"] == r1["grown_after"] == [1]
    assert len(r0["history"]) == 1 and r0["history"] == r1["history"]
    assert r0["params"] == r1["params"] > r0["params_before"]
    assert r0["hash"] == r1["hash"]
    # trained two more epochs after growth on different shards: equal only if DDP reduces the new parameters
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def test_schedule_follows_the_project_loop_and_bad_arguments_say_so() -> None:
    at = FireflyCallback("random", at=[3, 1, 3])
    assert [e for e in range(1, 8) if at.grows_after(e, 5)] == [1, 3]
    every = FireflyCallback("random", every=2)
    assert [e for e in range(1, 10) if every.grows_after(e, 8)] == [2, 4, 6]  # never after the last epoch
    warm = FireflyCallback("random", every=3, warmup=1)
    assert [e for e in range(1, 10) if warm.grows_after(e, None)] == [1, 4, 7]
    for kwargs, msg in [({}, "give at="), ({"at": [1], "every": 2}, "give at="), ({"every": 0}, "every must be"),
                        ({"at": [1], "warmup": 2}, "only used with every")]:
        with pytest.raises(ValueError, match=msg):
            FireflyCallback("random", **kwargs)
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert default_batch((x, y)) == (x, y) and default_batch({"input": x, "labels": y}) == (x, y)
    with pytest.raises(TypeError, match="pass batch="):
        default_batch(x)
