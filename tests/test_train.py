"""Training loop, configs, schedules and checkpoints (fast: tiny digits MLPs, seconds each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from runlogs import read_jsonl, strip_times
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from firefly_descent.methods.base import _REGISTRY, Grower, GrowthReport
from firefly_descent.train import (
    Config,
    ConfigError,
    DeviceLoader,
    LRSchedule,
    config_from_dict,
    growth_epochs,
    list_checkpoints,
    load_checkpoint,
    load_config,
    named_configs,
    refresh_batchnorm,
    resume,
    train,
)
from firefly_descent.train.checkpoint import rebuild_model
from firefly_descent.train.config import ScheduleConfig, apply_overrides
from firefly_descent.train.schedule import inert_milestones, short_phase_notice

# --------------------------------------------------------------------------- fake growers


class NoopGrower(Grower):
    """Touches nothing; counts the batches it was given."""

    name = "test-noop"

    def grow(self, model, data, loss_fn, optimizer=None, example_inputs=None) -> GrowthReport:  # type: ignore[override]
        n = sum(1 for _ in data)
        return GrowthReport(method=self.name, extra={"batches": n})


class WidenGrower(Grower):
    """Adds 2 random-init units to every growable group through the engine (consumes the RNG)."""

    name = "test-widen"

    def __init__(self, units: int = 2, deepen: bool = False) -> None:
        self.units, self.deepen = units, deepen

    def grow(self, model, data, loss_fn, optimizer=None, example_inputs=None) -> GrowthReport:  # type: ignore[override]
        from firefly_descent.analysis import analyze
        from firefly_descent.engine import deepen, widen

        x = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        before = {n: g.width for n, g in analyze(model, x).groups.items() if not g.blocked}
        params_before = sum(p.numel() for p in model.parameters())
        widen(model, x, {n: self.units for n in before}, mode="zero", optimizer=optimizer)
        layers = []
        if self.deepen:
            first = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
            deepen(model, x, [first], optimizer=optimizer)
            layers.append(first)
        after = {n: g.width for n, g in analyze(model, x).groups.items() if not g.blocked}
        return GrowthReport(
            method=self.name,
            units_added={n: self.units for n in before},
            layers_inserted=layers,
            widths_before=before,
            widths_after=after,
            params_before=params_before,
            params_after=sum(p.numel() for p in model.parameters()),
        )


class ValGrower(NoopGrower):
    name = "test-val"
    needs_validation = True

    def grow(self, model, data, loss_fn, optimizer=None, example_inputs=None) -> GrowthReport:  # type: ignore[override]
        n_val = sum(1 for _ in self.val_data)  # type: ignore[attr-defined]
        return GrowthReport(method=self.name, extra={"val_batches": n_val})


@pytest.fixture(autouse=True)
def fake_growers():
    added = {"test-noop": NoopGrower, "test-widen": WidenGrower, "test-val": ValGrower}
    saved = {k: _REGISTRY[k] for k in added if k in _REGISTRY}
    _REGISTRY.update(added)
    yield
    for k in added:
        _REGISTRY.pop(k, None)
    _REGISTRY.update(saved)


def tiny(**sections: Any) -> dict[str, Any]:
    """A seconds-long digits MLP config; keyword sections are merged over the defaults."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "mlp", "kwargs": {"hidden": [8, 8]}},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine"},
        "growth": {"method": "test-widen", "every": 1, "max_growths": 2},
        "train": {"epochs": 4, "seed": 0},
        "checkpoint": {"keep_last": 100},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["model_state"]


# --------------------------------------------------------------------------- config


def test_defaults_and_named_configs_validate():
    assert isinstance(config_from_dict({}), Config)
    names = named_configs()
    for required in (
        "fashion-vgg-firefly",
        "fashion-vgg-static",
        "mnist1d-mlp-firefly",
        "digits-mlp-firefly",
    ):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_are_yaml_parsed():
    cfg = load_config(tiny(), ["optim.lr=0.01", "model.kwargs.hidden=[4, 4]", "growth.at=[1,2]", "growth.every=null"])
    assert cfg.optim.lr == 0.01 and cfg.model.kwargs["hidden"] == [4, 4] and cfg.growth.at == [1, 2]
    assert apply_overrides({}, ["a.b.c=yes"]) == {"a": {"b": {"c": True}}}


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("optim.lrr=0.1", "optim.lrr", "allowed keys"),
        ("bogus=1", "bogus", "allowed keys"),
        ("data.batch_size=abc", "data.batch_size", "expected int"),
        ("train.epochs=2.5", "train.epochs", "expected int"),
        ("schedule.restart_after_growth=3", "schedule.restart_after_growth", "expected bool"),
        ("optim.name=sgdd", "optim.name", "sgd, adam, adamw"),
        ("schedule.name=linear", "schedule.name", "step, cosine, constant"),
        ("train.epochs=-1", "train.epochs", ">= 1"),
        ("growth.every=0", "growth.every", ">= 1"),
        ("growth.every=null;growth.at=[2, 9]", "growth.at", "1..3"),
        ("growth.warmup_epochs=7", "growth.every", "beyond the run"),
        ("growth.max_params=-5", "growth.max_params", ">= 1"),
        ("growth.max_growths=-1", "growth.max_growths", ">= 0"),
        ("schedule.milestones=[0.5, 2]", "schedule.milestones", "(0, 1)"),
    ],
)
def test_config_errors_name_the_key(override, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(tiny(), override.split(";"))
    msg = str(e.value)
    assert msg.startswith(key + ":") or msg.startswith(key + "["), msg
    assert hint in msg and "\n" not in msg


def test_growth_epoch_semantics():
    def epochs(**g: Any) -> list[int]:
        cfg = tiny(growth={"every": None, "max_growths": None, **g}, train={"epochs": 10})
        return growth_epochs(config_from_dict(cfg))

    assert epochs(every=3) == [3, 6, 9]
    assert epochs(every=3, warmup_epochs=2) == [2, 5, 8]
    assert epochs(every=2, max_growths=2) == [2, 4]
    assert epochs(at=[7, 1]) == [1, 7]
    with pytest.raises(ConfigError, match="growth.at: give growth.every or growth.at"):
        config_from_dict(tiny(growth={"every": 2, "at": [3]}))
    with pytest.raises(ConfigError, match="^growth.every: method 'firefly' needs a schedule"):
        config_from_dict(tiny(growth={"method": "firefly", "every": None}))


def test_impossible_budget_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^growth.max_params: 100 is not above the initial model's"):
        train(tiny(growth={"max_params": 100}), out, progress=False)
    assert not out.exists()


def test_unknown_method_model_and_dataset_write_nothing(tmp_path):
    out = tmp_path / "run"
    for cfg, key in [
        (tiny(growth={"method": "nope"}), "growth.method"),
        (tiny(model={"name": "nope"}), "model.name"),
        (tiny(model={"kwargs": {"bogus": 1}}), "model.kwargs"),
        (tiny(data={"name": "nope"}), "data"),
        (tiny(data={"name": "fashion-mnist", "root": str(tmp_path / "missing")}), "data"),
        (tiny(growth={"method": "test-val"}), "data.val_fraction"),
    ]:
        with pytest.raises(ConfigError) as e:
            train(cfg, out, progress=False)
        assert str(e.value).startswith(key), str(e.value)
        assert not out.exists()


# --------------------------------------------------------------------------- schedule and helpers


def test_lr_schedule_step_cosine_and_restart():
    step = LRSchedule(ScheduleConfig(name="step", milestones=[0.5, 0.75], gamma=0.1), 1.0, 0, 8)
    assert [round(step.lr_at(e), 6) for e in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = LRSchedule(ScheduleConfig(name="cosine", min_lr=0.0), 1.0, 0, 2)
    assert cos.lr_at(0, 0, 10) == pytest.approx(1.0)
    assert cos.lr_at(1, 0, 10) == pytest.approx(0.5)
    assert cos.lr_at(1, 9, 10) < 0.03
    cos.new_phase(2, 4)  # restart after a growth at epoch 2
    assert cos.lr_at(2, 0, 10) == pytest.approx(1.0)
    const = LRSchedule(ScheduleConfig(name="constant"), 0.3, 0, 5)
    assert const.lr_at(4, 3, 5) == 0.3


def _step_lrs(cfg: dict[str, Any], out: Path) -> list[float]:
    """The learning rate of every optimizer step of a run."""
    lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        train(cfg, out, progress=False)
    finally:
        hook.remove()
    return lrs


def test_warmup_after_growth_ramps_from_the_rate_before_growth(tmp_path):
    """Issue 26: the restart jumped a freshly grown model from the decayed rate to the full one in one step (x10
    here); `schedule.warmup_after_growth` ramps it over that many epochs, and leaves the run before growth alone."""
    cfg = tiny(
        schedule={"name": "step", "milestones": [0.5], "gamma": 0.1, "restart_after_growth": True},
        growth={"every": None, "max_growths": None, "at": [2]},
        train={"epochs": 3},
    )
    jump = _step_lrs(cfg, tmp_path / "jump")
    warm = _step_lrs({**cfg, "schedule": {**cfg["schedule"], "warmup_after_growth": 1.0}}, tmp_path / "warm")
    nb = len(jump) // 3
    assert len(warm) == len(jump) == 3 * nb
    assert warm[: 2 * nb] == jump[: 2 * nb]  # before growth: unchanged
    assert jump[2 * nb - 1] == pytest.approx(0.01) and jump[2 * nb] == pytest.approx(0.1)  # the old jump
    ramp = warm[2 * nb :]
    assert ramp[0] == pytest.approx(0.01)  # starts where the rate was before growth
    assert all(b > a for a, b in zip(ramp, ramp[1:]))  # rises every step
    assert ramp[-1] == pytest.approx(0.01 + (nb - 1) / nb * 0.09)  # linear over one epoch
    ckpt = load_checkpoint(tmp_path / "warm")  # checkpoints carry the ramp, so a resumed run continues it
    assert ckpt["schedule"]["warm_from"] == pytest.approx(0.01) and ckpt["schedule"]["warm_start"] == 2


def test_step_per_batch_decays_the_one_epoch_phase_after_growth(tmp_path):
    """Issue 26: with the restart, the one-epoch phase after a growth never reached its 0.5 milestone, so the
    run ended at 10x the rate it grew at; `schedule.step_per_batch` steps mid-epoch (epoch boundaries unchanged)."""
    sched = {"name": "step", "milestones": [0.5], "gamma": 0.1, "restart_after_growth": True}
    cfg = tiny(schedule=sched, growth={"every": None, "max_growths": None, "at": [2]}, train={"epochs": 3})
    assert "too short for milestone 0.5" in (short_phase_notice(load_config(cfg)) or "")  # said when it starts
    old = _step_lrs(cfg, tmp_path / "old")
    new_cfg = {**cfg, "schedule": {**sched, "step_per_batch": True}}
    assert inert_milestones(load_config(new_cfg)) == [] and short_phase_notice(load_config(new_cfg)) is None
    new = _step_lrs(new_cfg, tmp_path / "new")
    nb = len(old) // 3
    assert new[: 2 * nb] == old[: 2 * nb]  # the two-epoch phase steps at its epoch boundary either way
    assert old[2 * nb :] == pytest.approx([0.1] * nb)  # old: the whole last epoch at the restarted rate
    half = -(-nb // 2)  # the first batch at or past the milestone
    assert new[2 * nb :] == pytest.approx([0.1] * half + [0.01] * (nb - half))


def test_fashion_presets_step_per_batch_changes_only_one_epoch_phases():
    """The presets turn `step_per_batch` on: their own 2-epoch phases step at the same batches as before, and the
    issue's 3-epoch variant (growth after epoch 2) now decays in its last epoch instead of ending at 10x."""

    def rates(overrides: list[str], nb: int = 8) -> list[float]:
        cfg = load_config("fashion-vgg-firefly", overrides)
        sched = LRSchedule.from_config(cfg, growth_epochs(cfg)[0])
        out = []
        for e in range(cfg.train.epochs):
            if e in growth_epochs(cfg):
                nxt = [g for g in growth_epochs(cfg) if g > e]
                sched.new_phase(e, nxt[0] if nxt else cfg.train.epochs)
            out += [sched.lr_at(e, b, nb) for b in range(nb)]
        return out

    assert rates([]) == rates(["schedule.step_per_batch=false"])
    short = ["train.epochs=3", "growth.at=[2]"]
    assert rates(short)[16:] == pytest.approx([0.05] * 4 + [0.005] * 4)
    assert rates([*short, "schedule.step_per_batch=false"])[16:] == pytest.approx([0.05] * 8)


def test_refresh_batchnorm_is_cumulative_and_restores_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.3))
    batches = [(torch.randn(16, 4) * 2 + 1, torch.zeros(16)) for _ in range(3)]
    model.eval()
    assert refresh_batchnorm(model, batches, max_batches=2) == 1  # the engine's, re-exported
    bn = model[1]
    assert bn.momentum == 0.3 and not model.training
    with torch.no_grad():
        means = [model[0](x).mean(0) for x, _ in batches[:2]]
    torch.testing.assert_close(bn.running_mean, (means[0] + means[1]) / 2)


def test_device_loader_limits_and_moves():
    data = [(torch.ones(2, 3), torch.zeros(2)) for _ in range(5)]
    loader = DeviceLoader(data, torch.device("cpu"), max_batches=3)
    assert len(loader) == 3 and sum(1 for _ in loader) == 3


# --------------------------------------------------------------------------- runs


def test_train_end_to_end_files_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny(checkpoint={"keep_last": 2}), out, progress=False)
    assert summary["epochs"] == 4 and summary["num_growths"] == 2
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    keys = (
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "params",
        "flops",
        "lr",
        "epoch_time",
        "growth_time",
    )
    assert all(k in rows[0] for k in keys)
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"] == rows[3]["params"]
    assert rows[1]["growth_time"] > 0 and rows[0]["growth_time"] == 0
    growths = read_jsonl(out / "growth.jsonl")
    assert [g["epoch"] for g in growths] == [1, 2]
    assert growths[0]["widths_after"] and growths[0]["params_after"] > growths[0]["params_before"]
    # anytime metrics: each growth record carries the held-out numbers 1 and 3 epochs after it
    by_epoch = {r["epoch"]: r for r in rows}
    assert sorted(growths[0]["after_epochs"]) == ["1", "3"] and sorted(growths[1]["after_epochs"]) == ["1"]
    for g in growths:
        for k, after in g["after_epochs"].items():
            row = by_epoch[g["epoch"] + int(k)]
            assert (after["test_loss"], after["test_acc"], after["params"]) == (
                row["test_loss"], row["test_acc"], row["params"])
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 2  # keep_last
    raw = torch.load(ckpts[-1], weights_only=True)
    assert raw["epoch"] == 4 and len(raw["growth_history"]) == 2
    assert isinstance(raw["rng"]["torch"], torch.Tensor)
    # the grown checkpoint rebuilds from constructor + history with identical outputs
    ckpt = load_checkpoint(out)
    model = rebuild_model(ckpt).eval()
    x = ckpt["example_inputs"]
    with torch.no_grad():
        y1 = model(x)
    assert state_equal(model.state_dict(), ckpt["model_state"])
    model2 = rebuild_model(load_checkpoint(ckpts[-1])).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), y1, rtol=0, atol=0)


def test_same_seed_is_deterministic_and_seed_matters(tmp_path):
    a = train(tiny(), tmp_path / "a", progress=False)
    b = train(tiny(), tmp_path / "b", progress=False)
    c = train(tiny(train={"seed": 1}), tmp_path / "c", progress=False)
    assert state_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    assert a["final_test_loss"] == b["final_test_loss"]
    assert c["final_test_loss"] != a["final_test_loss"]


def test_refuses_existing_run_dir(tmp_path):
    out = tmp_path / "run"
    train(tiny(train={"epochs": 1}, growth={"every": None, "max_growths": 0}), out, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(), out, progress=False)


@pytest.mark.parametrize(
    "keep",
    [
        0,  # killed during epoch 1, before any checkpoint: resume starts over from config.yaml
        1,  # after epoch 1 ("trained"; its growth is still pending)
        2,  # right after growth 1 (the "g" checkpoint)
        5,  # after epoch 3
    ],
)
def test_resume_from_any_checkpoint_matches_uninterrupted(tmp_path, keep):
    cfg = tiny(optim={"name": "adam", "lr": 0.01}, growth={"kwargs": {"deepen": True}})
    ref = train(cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    ckpts = list_checkpoints(out)
    assert [p.name[12:] for p in ckpts] == [
        "e0001.pt",
        "e0001g.pt",
        "e0002.pt",
        "e0002g.pt",
        "e0003.pt",
        "e0004.pt",
    ]
    for p in ckpts[keep:]:
        p.unlink()  # as if the process had been killed after checkpoint `keep`
    (out / "summary.json").unlink()
    got = resume(out, progress=False)
    assert state_equal(final_state(out), final_state(tmp_path / "ref"))
    assert strip_times(read_jsonl(out / "metrics.jsonl")) == strip_times(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert strip_times(read_jsonl(out / "growth.jsonl")) == strip_times(read_jsonl(tmp_path / "ref" / "growth.jsonl"))
    assert got["final_test_loss"] == ref["final_test_loss"]


def test_resume_of_finished_run_is_a_noop(tmp_path):
    out = tmp_path / "run"
    first = train(tiny(), out, progress=False)
    before = final_state(out)
    again = resume(out, progress=False)
    assert again["final_test_loss"] == first["final_test_loss"]
    assert state_equal(before, final_state(out))


def test_validation_split_and_needs_validation(tmp_path):
    out = tmp_path / "run"
    train(
        tiny(data={"val_fraction": 0.2}, growth={"method": "test-val"}, train={"epochs": 2}),
        out,
        progress=False,
    )
    rows = read_jsonl(out / "metrics.jsonl")
    assert "val_acc" in rows[0]
    assert read_jsonl(out / "growth.jsonl")[0]["extra"]["val_batches"] > 0


def test_param_target_stops_growth_and_lr_continues(tmp_path):
    out = tmp_path / "run"
    train(tiny(growth={"max_params": 800, "max_growths": None}, train={"epochs": 5}), out, progress=False)
    growths = read_jsonl(out / "growth.jsonl")
    assert len(growths) == 1 and growths[0]["params"] >= 800
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["lr"] < 0.01  # the last phase ran to the end of the run (cosine annealed)


def test_budget_schedule_gives_each_growth_step_its_own_budget(tmp_path):
    """growth.budgets: step k spends at most budgets[k] (here parameters), close to all of it; later steps fall
    back to the grower's own budget; the schedule survives a resume (the step index is the run's growth count)."""
    budgets = ["params:300", "params:900"]
    cfg = tiny(
        growth={"method": "random", "kwargs": {"budget": 0.25}, "max_growths": 3, "budgets": budgets},
        train={"epochs": 4},
    )
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    growths = read_jsonl(out / "growth.jsonl")
    assert len(growths) == 3
    for g, limit in zip(growths, (300, 900)):
        # the budget prices each unit at the current widths (layer 1: 64 in + 1 bias + w2 out; layer 2: w1 in + 1 +
        # 10 out); units added to both layers at once also meet each other: k1 * k2 more weights
        (w1, w2), (a1, a2) = g["widths_before"].values(), g["widths_after"].values()
        k1, k2 = a1 - w1, a2 - w2
        priced = k1 * (64 + 1 + w2) + k2 * (w1 + 1 + 10)
        assert g["params_after"] - g["params_before"] == priced + k1 * k2
        assert limit - (64 + 1 + w2) < priced <= limit  # all of the step's budget that fits, no more
    widths = growths[2]["widths_before"]
    assert sum(growths[2]["widths_after"].values()) - sum(widths.values()) == int(0.25 * sum(widths.values()))
    # killed right after the first growth and resumed: same schedule, same model
    ref = final_state(out)
    for p in list_checkpoints(out)[2:]:
        p.unlink()
    (out / "summary.json").unlink()
    resume(out, progress=False)
    assert state_equal(final_state(out), ref)
    assert strip_times(read_jsonl(out / "growth.jsonl")) == strip_times(growths)


def test_budget_schedule_errors_name_the_key(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^growth.budgets\[1\]: cannot read a budget from 'lots'"):
        train(tiny(growth={"method": "random", "budgets": ["params:300", "lots"]}), out, progress=False)
    with pytest.raises(ConfigError, match=r"^growth.budgets: growth method 'test-noop' has no budget to replace"):
        train(tiny(growth={"method": "test-noop", "budgets": [0.5]}), out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("optim", ["sgd", "adam", "adamw"])
def test_optimizers_and_label_smoothing(tmp_path, optim):
    cfg = tiny(
        optim={"name": optim, "lr": 0.05 if optim == "sgd" else 0.01, "label_smoothing": 0.1},
        schedule={"name": "step", "restart_after_growth": False},
        train={"epochs": 3},
    )
    summary = train(cfg, tmp_path / optim, progress=False)
    assert summary["final_test_acc"] > 0.2


def test_regression_dataset(tmp_path):
    cfg = tiny(data={"name": "teacher-student"}, growth={"method": "test-noop"}, train={"epochs": 2})
    summary = train(cfg, tmp_path / "reg", progress=False)
    assert summary["final_test_acc"] is None and summary["final_test_loss"] is not None


def test_vgg_with_batchnorm_refresh(tmp_path):
    cfg = tiny(
        model={"name": "vgg11", "kwargs": {"widths": 4, "max_pools": 2}},
        growth={"max_growths": 1, "refresh_bn": True, "refresh_bn_batches": 3},
        train={"epochs": 2},
    )
    out = tmp_path / "vgg"
    train(cfg, out, progress=False)
    g = read_jsonl(out / "growth.jsonl")[0]
    assert g["bn_layers_refreshed"] > 0
    # test-widen adds 2 new units to each of VGG-11's 8 conv groups, each normalised by one BatchNorm
    assert g["bn_channels_calibrated"] == 2 * 8
    ckpt = load_checkpoint(out)
    model = rebuild_model(ckpt).eval()
    assert state_equal(model.state_dict(), ckpt["model_state"])


# --------------------------------------------------------------------------- the real growers


def _real_growers() -> list[str]:
    try:
        import firefly_descent.methods as methods
    except ImportError:
        return []
    if not hasattr(methods, "available_growers"):
        return []
    return [n for n in methods.available_growers() if not n.startswith("test-")]


@pytest.mark.parametrize("method", _real_growers() or ["(none registered)"])
def test_each_grower_end_to_end_and_exact_resume(tmp_path, method):
    """Every registered grower trains end to end, rebuilds from its checkpoint, and resumes exactly."""
    if method == "(none registered)":
        pytest.skip("firefly_descent.methods has no growers yet")
    from firefly_descent.methods import make_grower

    needs_val = bool(getattr(make_grower(method), "needs_validation", False))
    cfg = tiny(
        data={"val_fraction": 0.2 if needs_val else 0.0},
        growth={"method": method, "every": 1, "max_growths": 1, "data_batches": 4},
        train={"epochs": 2},
    )
    out = tmp_path / method
    summary = train(cfg, out, progress=False)
    assert summary["num_growths"] == 1
    growths = read_jsonl(out / "growth.jsonl")
    rows = read_jsonl(out / "metrics.jsonl")
    if method not in ("static", "none"):
        assert growths[0]["params"] > rows[0]["params"], growths[0]
    ckpt = load_checkpoint(out)
    model = rebuild_model(ckpt).eval()
    assert state_equal(model.state_dict(), ckpt["model_state"])
    # kill before the growth (keep only the epoch-1 checkpoint) and resume: same weights, same metrics
    final = ckpt["model_state"]
    ckpts = list_checkpoints(out)
    for p in ckpts[1:]:
        p.unlink()
    resume(out, progress=False)
    assert state_equal(final_state(out), final)
    assert strip_times(read_jsonl(out / "metrics.jsonl")) == strip_times(rows)


def test_callbacks_see_epochs_growths_and_end(tmp_path):
    seen: list[tuple[str, Any]] = []

    class Recorder:
        def on_epoch_end(self, row, model):
            seen.append(("epoch", row["epoch"]))

        def on_growth(self, record, model):
            seen.append(("growth", record["epoch"]))

        def on_train_end(self, summary, model):
            seen.append(("end", summary["epochs"]))

    train(tiny(train={"epochs": 3}), tmp_path / "cb", progress=False, callbacks=[Recorder()])
    assert seen == [("epoch", 1), ("growth", 1), ("epoch", 2), ("growth", 2), ("epoch", 3), ("end", 3)]
