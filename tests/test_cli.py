"""The `firefly` command line: errors, kill + resume, report, inspect, export (fast, tiny configs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from runlogs import read_jsonl, strip_times

from firefly_descent.cli import main
from firefly_descent.train import list_checkpoints, load_checkpoint, train
from firefly_descent.train.checkpoint import rebuild_model

# A CLI runner for subprocesses: registers a small engine-based grower ("cli-widen", which draws
# from the RNG) so the tests do not depend on which growth methods exist, and can slow each
# batch down (FIREFLY_TEST_SLOW seconds) so a kill reliably lands in the middle of an epoch.
GROWER_SRC = r"""
from firefly_descent.methods.base import Grower, GrowthReport, register_grower

@register_grower("cli-widen")
class CliWiden(Grower):
    name = "cli-widen"
    def grow(self, model, data, loss_fn, optimizer=None, example_inputs=None):
        from firefly_descent.analysis import analyze
        from firefly_descent.engine import widen
        x = (example_inputs,)
        groups = {n: g.width for n, g in analyze(model, x).groups.items() if not g.blocked}
        widen(model, x, {n: 3 for n in groups}, mode="zero", optimizer=optimizer)
        after = {n: g.width for n, g in analyze(model, x).groups.items() if not g.blocked}
        return GrowthReport(method=self.name, widths_before=groups, widths_after=after,
                            units_added={n: 3 for n in groups})
"""

RUNNER = (
    GROWER_SRC
    + r"""
import os, sys, time

slow = float(os.environ.get("FIREFLY_TEST_SLOW", "0") or 0)
if slow:
    import firefly_descent.train.epochs as epochs
    _orig = epochs.to_device
    def _slow(batch, device):
        time.sleep(slow)
        return _orig(batch, device)
    epochs.to_device = _slow

from firefly_descent.cli import main
sys.exit(main(sys.argv[1:]))
"""
)


@pytest.fixture(autouse=True)
def cli_grower():
    """Register the same grower in this process (for in-process `main([...])` calls)."""
    from firefly_descent.methods.base import _REGISTRY

    saved = _REGISTRY.get("cli-widen")
    exec(GROWER_SRC, {})
    yield
    _REGISTRY.pop("cli-widen", None)
    if saved is not None:
        _REGISTRY["cli-widen"] = saved


def tiny(**sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "cli-tiny",
        "data": {"name": "digits", "batch_size": 32},
        "model": {"name": "mlp", "kwargs": {"hidden": [8, 8]}},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "step", "milestones": [0.5]},
        "growth": {"method": "cli-widen", "at": [2]},
        "train": {"epochs": 3, "seed": 3, "threads": 1},  # one thread: subprocess runs stay fast on a busy CPU
        "checkpoint": {"keep_last": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.fixture()
def runner(tmp_path: Path) -> Path:
    path = tmp_path / "firefly_runner.py"
    path.write_text(RUNNER)
    return path


def run_cli(runner: Path, *args: str, cwd: Path | None = None, slow: float = 0.0, **kw: Any):
    env = {**os.environ, "FIREFLY_TEST_SLOW": str(slow)}
    return subprocess.run(
        [sys.executable, str(runner), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        **kw,
    )


def write_cfg(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["optim.lrr=0.1"], "optim.lrr"),  # unknown key
        (["data.batch_size=big"], "data.batch_size"),  # wrong type
        (["growth.at=[5]"], "growth.at"),  # impossible schedule: growth after the last epoch
        (["growth.at=null", "growth.every=0"], "growth.every"),  # impossible schedule: every=0
        (["train.epochs=-2"], "train.epochs"),  # impossible schedule: negative epochs
        (["growth.max_params=10"], "growth.max_params"),  # impossible budget: below the initial model
        (["growth.max_flops=-1"], "growth.max_flops"),  # impossible budget: negative
        (["data.name=no-such-data"], "data"),  # unknown dataset
        (["data.name=fashion-mnist", "data.root=/nonexistent/fm"], "data"),  # dataset files missing
        (["model.name=resnet9000"], "model.name"),
        (["growth.method=no-such-method"], "growth.method"),
    ],
)
def test_config_errors_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, sets, key):
    cfg = write_cfg(tmp_path / "c.yaml", tiny())
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["train", str(cfg)]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {key}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/ dir, nothing written


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    cases = [
        ["train", str(tmp_path / "missing.yaml")],
        ["train", "no-such-named-config"],
        ["train", "digits-mlp-firefly", "--set", "novalue"],
        ["resume", str(tmp_path / "nope")],
        ["inspect", str(tmp_path / "nope.pt")],
        ["export", str(tmp_path / "nope.pt"), str(tmp_path / "exp")],
        ["report", str(tmp_path)],
        ["configs", "--show", "nope"],
    ]
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    cases.append(["train", str(tmp_path / "bad.yaml")])
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "exp").exists()


def test_subprocess_error_has_no_traceback(runner, tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", tiny())
    res = run_cli(runner, "train", str(cfg), "--set", "train.epochs=abc", "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: train.epochs: expected int")
    assert not (tmp_path / "run").exists()


def test_configs_lists_named_configs(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("fashion-vgg-firefly", "fashion-vgg-static", "mnist1d-mlp-firefly", "digits-mlp-firefly"):
        assert name in out
    assert main(["configs", "--show", "digits-mlp-firefly"]) == 0
    assert "growth:" in capsys.readouterr().out


def test_console_script_module_entry():
    res = subprocess.run(
        [sys.executable, "-m", "firefly_descent.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "resume" in res.stdout and "export" in res.stdout


# --------------------------------------------------------------------------- kill and resume


KILL_CFG = tiny(train={"epochs": 4}, growth={"at": [1, 3]})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the kill-test config run start to finish without interruption."""
    tmp = tmp_path_factory.mktemp("ref")
    runner = tmp / "firefly_runner.py"
    runner.write_text(RUNNER)
    ref = tmp / "ref"
    res = run_cli(runner, "train", str(write_cfg(tmp / "c.yaml", KILL_CFG)), "--out", str(ref))
    assert res.returncode == 0, res.stderr
    return ref


@pytest.mark.parametrize(
    ("trigger", "delay"),
    [
        ("e0001.pt", 0.0),  # right after the first checkpoint: during growth 1 or early in epoch 2
        ("e0001g.pt", 0.05),  # after the post-growth checkpoint: mid-epoch 2 (45 batches x 10 ms)
    ],
)
def test_killed_run_resumes_to_identical_result(runner, tmp_path, uninterrupted, trigger, delay):
    ref = uninterrupted
    cfg = write_cfg(tmp_path / "c.yaml", KILL_CFG)
    out = tmp_path / "killed"
    env = {**os.environ, "FIREFLY_TEST_SLOW": "0.01"}
    proc = subprocess.Popen(
        [sys.executable, str(runner), "train", str(cfg), "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not any(p.name.endswith(trigger) for p in list_checkpoints(out)):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.time() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert len(read_jsonl(out / "metrics.jsonl")) == 1  # killed mid-epoch 2
    assert not (out / "summary.json").exists()

    res = run_cli(runner, "resume", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    a, b = load_checkpoint(ref), load_checkpoint(out)
    assert a["epoch"] == b["epoch"] == 4 and a["num_growths"] == b["num_growths"] == 2
    assert a["model_state"].keys() == b["model_state"].keys()
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    assert strip_times(read_jsonl(out / "metrics.jsonl")) == strip_times(read_jsonl(ref / "metrics.jsonl"))
    assert strip_times(read_jsonl(out / "growth.jsonl")) == strip_times(read_jsonl(ref / "growth.jsonl"))
    # every checkpoint left is weights_only-loadable
    for p in list_checkpoints(out):
        assert torch.load(p, weights_only=True)["format"] == "firefly-descent-checkpoint"


# --------------------------------------------------------------------------- report, inspect, export


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory) -> Path:
    """One run grown twice (8 -> 11 -> 14 units per hidden layer), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("grown")
    runner = tmp / "firefly_runner.py"
    runner.write_text(RUNNER)
    cfg = write_cfg(tmp / "g.yaml", tiny(growth={"at": [1, 2]}))
    out = tmp / "grown"
    res = run_cli(runner, "train", str(cfg), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def test_report_writes_table_and_plots(grown_run, tmp_path, capsys):
    static = tmp_path / "static"
    train(tiny(growth={"at": None, "max_growths": 0}), static, progress=False)
    rep = tmp_path / "rep"
    assert main(["report", str(grown_run), str(static), "--out", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "| grown |" in out and "| static |" in out
    md = (rep / "report.md").read_text()
    assert "final test acc" in md and "growth time" in md
    for png in ("acc_vs_params.png", "curves.png", "widths.png"):
        data = (rep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    rows = json.loads((rep / "summary.json").read_text())
    assert rows[0]["growths"] == 2 and rows[1]["growths"] == 0


def test_inspect_grown_checkpoint(grown_run, capsys):
    ckpt = list_checkpoints(grown_run)[-1]
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "MLP(" in out and "widths per growable group" in out
    assert "features.0" in out and "14" in out  # 8 + 3 + 3 units
    assert "params" in out and "2 growth(s)" in out
    assert main(["inspect", str(grown_run)]) == 0  # a run dir means its newest checkpoint


def test_export_grown_checkpoint_reloads_identically(grown_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from firefly_descent.engine import replay_history
    from firefly_descent.models import build_model

    exp = tmp_path / "exp"
    assert main(["export", str(grown_run), str(exp)]) == 0
    arch = json.loads((exp / "architecture.json").read_text())
    assert len(arch["growth_history"]) == 2
    assert yaml.safe_load((exp / "config.yaml").read_text())["growth"]["method"] == "cli-widen"
    model = build_model(arch["model"]["name"], **arch["model"]["kwargs"])
    replay_history(model, arch["growth_history"])
    model.load_state_dict(load_file(str(exp / "model.safetensors")))
    ckpt = load_checkpoint(grown_run)
    ref = rebuild_model(ckpt)
    x = ckpt["example_inputs"]
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert model.features[0].out_features == 14


# --------------------------------------------------------------------------- named configs


def _has(method: str) -> bool:
    try:
        from firefly_descent.methods import available_growers
    except ImportError:
        return False
    return method in available_growers()


@pytest.mark.skipif(not _has("firefly"), reason="the firefly grower is not available yet")
def test_named_digits_config_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["train", "digits-mlp-firefly", "--set", "train.epochs=3", "--out", str(out), "--no-progress"]) == 0
    assert "done:" in capsys.readouterr().out
    growths = read_jsonl(out / "growth.jsonl")
    assert len(growths) == 1 and growths[0]["params"] > growths[0]["params_before"]
    ckpt = load_checkpoint(out)
    with torch.no_grad():
        y = rebuild_model(ckpt).eval()(ckpt["example_inputs"])
    assert y.shape == (8, 10)
