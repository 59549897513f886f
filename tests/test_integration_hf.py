"""Growth inside transformers.Trainer (integrations/hf.py): resume after growth is exact, no parameter is left
out of the optimizer after growth, a saved grown model reloads. Tiny models built from code, on synthetic data,
on the CPU; nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import firefly_descent as ff  # noqa: E402
from firefly_descent.engine import growth_history, plan_deepen  # noqa: E402
from firefly_descent.errors import GrowthError  # noqa: E402
from firefly_descent.integrations.hf import (  # noqa: E402
    HISTORY_FILE,
    FireflyTrainerCallback,
    load_grown,
    prepare_resume,
    read_history,
    save_history,
)
from firefly_descent.methods import Grower  # noqa: E402


class TinyNet(nn.Module):
    """A plain nn.Module that follows the transformers convention: forward(**batch) returns a dict with `loss`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.fc2(torch.relu(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class DeepNet(nn.Module):
    """Two hidden layers in a Sequential: Firefly's depth candidates insert a residual Linear block there."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.body(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Blobs(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _args(out: str, epochs: int = 3, **kw) -> TrainingArguments:
    base = dict(num_train_epochs=epochs, per_device_train_batch_size=16, learning_rate=0.05, report_to=[],
                use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(out, **base)


def _train(out: str, resume: str | None = None, callbacks: tuple = (), build: type[nn.Module] = TinyNet,
           grower: dict | Grower | None = None, **kw) -> tuple[nn.Module, Trainer]:
    torch.manual_seed(0)
    model = build()
    if resume is not None:
        prepare_resume(model, resume)
    if isinstance(grower, Grower):
        grow = FireflyTrainerCallback(grower, at=[1])
    else:
        grow = FireflyTrainerCallback(at=[1], **{"budget": 0.5, **(grower or {})})
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=Blobs(), callbacks=[grow, *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_resume_after_growth_is_exact(tmp_path):
    # 4 steps an epoch, growth after epoch 1 (step 4), checkpoints every 6 steps: checkpoint-6 is mid-epoch 2
    full, _ = _train(str(tmp_path / "a"), save_strategy="steps", save_steps=6)
    assert full.fc1.out_features > 8 and len(growth_history(full)) == 1
    ckpt = tmp_path / "a" / "checkpoint-6"
    assert read_history(str(ckpt)) == growth_history(full)
    with open(ckpt / "trainer_state.json") as f:
        logged = [e for e in json.load(f)["log_history"] if "firefly/params_after" in e]
    assert len(logged) == 1 and logged[0]["step"] == 4
    assert logged[0]["firefly/params_before"] == 83 < logged[0]["firefly/params_after"] == sum(
        p.numel() for p in full.parameters()
    )
    resumed, _ = _train(str(tmp_path / "b"), resume=str(ckpt))
    assert resumed.fc1.out_features == full.fc1.out_features
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Deepen(Grower):
    """Inserts one identity-at-init residual layer after the first place that takes one (a depth step every time)."""

    name = "deepen-test"

    def decide(self, ctx):
        return plan_deepen(ctx.graph, [next(iter(ctx.graph.boundaries))])


def test_resume_after_depth_growth_is_exact_with_weight_decay(tmp_path):
    # the new layer's bias goes to the Trainer's no-decay group, where a resumed run's fresh optimizer has it
    run = dict(build=DeepNet, grower=_Deepen(), weight_decay=0.1)
    full, trainer = _train(str(tmp_path / "a"), save_strategy="steps", save_steps=6, **run)
    names = {id(p): n for n, p in full.named_parameters()}
    assert len(growth_history(full)) == 1
    decay, plain = trainer.optimizer.optimizer.param_groups
    # 3 Linear layers + the new one (and its residual scale), each parameter where Trainer's rule puts it
    assert sorted(names[id(p)].rsplit(".", 1)[1] for p in decay["params"]) == ["scale"] + ["weight"] * 4
    assert sorted(names[id(p)].rsplit(".", 1)[1] for p in plain["params"]) == ["bias"] * 4
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    resumed, _ = _train(str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-6"), **run)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Probe(TrainerCallback):
    """Before every optimizer step: whether the optimizer holds exactly the model's parameters and every one of
    them has a nonzero gradient."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, bool, bool]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer  # accelerate's wrapper
        held = [p for g in opt.param_groups for p in g["params"]]
        same = {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(set(map(id, held)))
        graded = all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        self.steps.append((model.fc1.out_features, same, graded))


def test_no_parameter_left_out_after_growth(tmp_path):
    probe = _Probe()
    model, trainer = _train(str(tmp_path / "a"), callbacks=(probe,), optim="adamw_torch")
    widths = [w for w, _, _ in probe.steps]
    assert widths[:4] == [8] * 4 and widths[4:] == [model.fc1.out_features] * 8 and widths[-1] > 8
    assert all(same and graded for _, same, graded in probe.steps)
    opt = trainer.optimizer.optimizer
    # the optimizer's state was carried across growth (Adam's step counts continue), not restarted
    for p in model.parameters():
        assert int(opt.state[p]["step"]) == 12
    # the scheduler drives the same optimizer: linear decay reached 0 at the last step
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_save_model_and_reload_reproduce_the_grown_model(tmp_path):
    out = str(tmp_path / "a")
    model, trainer = _train(out, epochs=2)
    trainer.save_model()  # args.output_dir, where the callback left the history at the end of training
    assert os.path.exists(os.path.join(out, HISTORY_FILE))
    back = load_grown(out, TinyNet)
    assert back.fc1.out_features == model.fc1.out_features > 8
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    model.eval()
    assert torch.equal(back(x)["logits"], model(x)["logits"])
    # elsewhere: the weights and save_history side by side
    other = str(tmp_path / "b")
    trainer.save_model(other)
    save_history(model, other)
    assert torch.equal(load_grown(other, TinyNet)(x)["logits"], model(x)["logits"])


def test_transformers_model_carries_its_history_in_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8, max_position_embeddings=12, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 40, (8, 6), generator=g), "labels": torch.randint(0, 2, (8,), generator=g)}
        for _ in range(3)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grow = FireflyTrainerCallback(at=[1], budget=0.5, data_batches=3)
    grow.grow(model, opt, batches)
    widths = grow.reports[0].widths_after
    assert widths["bert.encoder.layer.0.intermediate.dense"] > 8
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    model.save_pretrained(str(tmp_path))  # what trainer.save_model does for a transformers model
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["firefly_history"] == growth_history(model)
    back = load_grown(str(tmp_path), lambda: transformers.BertForSequenceClassification(cfg))
    model.eval()
    back.eval()
    x = batches[0]["input_ids"]
    assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)


def test_own_loss_function_and_batch_adapter():
    """Tuple batches through a batch adapter, the growth loss from `loss_fn(logits, labels)`."""
    data = Blobs()
    batches = [(data.x[i : i + 16], data.y[i : i + 16]) for i in range(0, 64, 16)]
    seen = []

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(logits.shape))
        return F.cross_entropy(logits, labels)

    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # the loss before growth, on the first k batches (the decision's; the rest is held out)
        losses = [F.cross_entropy(model(x)["logits"], y).item() for x, y in batches]
        before = [sum(losses[:k]) / k for k in range(1, 5)]
    grow = FireflyTrainerCallback(every=1, loss_fn=loss_fn, batch_adapter=lambda b: {"x": b[0], "labels": b[1]},
                                  budget=0.5)
    report = grow.grow(model, torch.optim.SGD(model.parameters(), lr=0.1), batches)
    assert (16, 3) in seen and report.widths_after["fc1"] == model.fc1.out_features > 8
    assert any(report.loss_before == pytest.approx(b, rel=1e-6) for b in before)


def test_schedule_and_batches_are_checked():
    with pytest.raises(GrowthError, match="exactly one of"):
        FireflyTrainerCallback(at=[1], every=2)
    with pytest.raises(GrowthError, match="exactly one of"):
        FireflyTrainerCallback()
    cb = FireflyTrainerCallback(every=2)
    assert [cb.due(e) for e in (1, 2, 3, 4)] == [False, True, False, True]
    with pytest.raises(GrowthError, match="dict batches"):
        cb.grow(TinyNet(), None, [(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(GrowthError, match="no 'labels'"):
        cb.grow(TinyNet(), None, [{"x": torch.randn(4, 6)}])


def test_a_loss_module_made_inside_forward_is_traced_into():
    """transformers models build `CrossEntropyLoss()` inside forward: analysis traces into that stateless module."""
    class LossInside(TinyNet):
        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return nn.CrossEntropyLoss()(self.fc2(torch.relu(self.fc1(x))), labels)

    graph = ff.analyze(LossInside(), (torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))
    assert graph["fc1"].width == 8 and not graph["fc1"].blocked
    assert graph["fc2"].blocked  # the loss has no channel rule: the output layer stays as it is
