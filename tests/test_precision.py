"""Mixed precision, torch.compile and channels_last in the training loop (CPU).

torch.compile is exercised with the ``aot_eager`` backend: dynamo captures the graph and AOTAutograd
traces forward and backward exactly as with inductor, without generating C++ (inductor needs a C
compiler and ~1 min per graph on this CPU, too slow for CI; benchmarks/gpu_check.sh runs inductor on CUDA).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from firefly_descent.cli import main
from firefly_descent.train.config import ConfigError, load_config
from firefly_descent.train.epochs import run_epochs
from firefly_descent.train.precision import autocast
from firefly_descent.train.setup import prepare
from firefly_descent.train.state import Run

BASE = {
    "name": "prec",
    "data": {"name": "digits", "batch_size": 32, "train_subset": 256, "test_subset": 128, "augment": None},
    "model": {"name": "vgg11", "kwargs": {"widths": 4}},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "restart_after_growth": True},
    "growth": {"method": "firefly", "kwargs": {"budget": 0.3}, "at": [1], "data_batches": 2, "refresh_bn_batches": 4},
    "train": {"epochs": 3, "seed": 0, "device": "cpu", "tensorboard": False},
}


MLP = {"name": "mlp", "kwargs": {"hidden": [8, 8]}}


def _cfg(model: dict | None = None, **train: object) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["train"].update(train)
    if model is not None:
        cfg["model"] = copy.deepcopy(model)
    return cfg


def _run(tmp_path: Path, model: dict | None = None, **train: object) -> Run:
    setup = prepare(load_config(_cfg(model, **train)))
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Run(setup, tmp_path, progress=False)


def test_bf16_autocast_on_cpu_trains_and_grows(tmp_path: Path) -> None:
    run = _run(tmp_path, precision="bf16")
    assert run.amp == "bf16" and run.scaler is None  # bf16 needs no loss scaling
    x = run.s.example_inputs
    with autocast(run.device, run.amp):
        assert run.model(x).dtype == torch.bfloat16  # the forward really runs in bf16
    summary = run_epochs(run)
    assert summary["num_growths"] == 1
    growth = json.loads((tmp_path / "growth.jsonl").read_text().splitlines()[0])
    assert growth["params_after"] > growth["params_before"]
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # growth and weights stay fp32
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["train", "digits-mlp-firefly", "--set", "train.precision=fp16", "--set", "train.device=cpu"]
        + ["--out", str(tmp_path / "r")]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train.precision: fp16 needs CUDA (device is cpu); use train.precision=bf16 or fp32"
    ]
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(_cfg(precision="fp8"))


def test_compiled_model_is_recompiled_after_growth_and_matches_eager(tmp_path: Path) -> None:
    run = _run(tmp_path, MLP, compile=True, compile_backend="aot_eager")
    first = run.rt.forward_module(run.model)
    assert run.rt.compiles == 1 and getattr(first, "_orig_mod", None) is run.model
    before = sum(p.numel() for p in run.model.parameters())
    run_epochs(run)
    assert sum(p.numel() for p in run.model.parameters()) > before
    assert run.rt.compiles == 2  # once at the start, once after the growth
    fwd = run.rt.forward_module(run.model)
    assert fwd is not first and fwd._orig_mod is run.model
    run.model.eval()
    x = run.s.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(fwd(x), run.model(x), atol=1e-5, rtol=1e-5)
    run.model.train()
    xb = torch.randn(16, *x.shape[1:])  # training mode (batch statistics), forward and backward
    out_c, out_e = fwd(xb), run.model(xb)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    gc = torch.autograd.grad(out_c.square().sum(), list(run.model.parameters()))
    ge = torch.autograd.grad(out_e.square().sum(), list(run.model.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_unusable_compile_backend_is_refused_in_one_line(tmp_path: Path) -> None:
    run = _run(tmp_path, MLP, compile=True, compile_backend="no-such-backend")
    with pytest.raises(ConfigError) as e:
        run.rt.forward_module(run.model)
    msg = str(e.value)
    assert msg.startswith("train.compile: torch.compile (backend 'no-such-backend') is not available here")
    assert "\n" not in msg and msg.endswith("set train.compile=false or another train.compile_backend")


def test_channels_last_survives_growth(tmp_path: Path) -> None:
    run = _run(tmp_path, channels_last=True)
    run.rt.forward_module(run.model)
    convs = lambda: [p for p in run.model.parameters() if p.dim() == 4]  # noqa: E731
    assert convs() and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs())
    n = len(convs())
    run_epochs(run)
    assert run.num_growths == 1
    grown = convs()
    assert len(grown) >= n and all(p.is_contiguous(memory_format=torch.channels_last) for p in grown)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_trains_and_grows(tmp_path: Path, precision: str) -> None:
    run = _run(tmp_path, precision=precision, device="cuda")
    assert run.device.type == "cuda"
    assert (run.scaler is not None) == (precision == "fp16")  # GradScaler for fp16 only
    summary = run_epochs(run)
    assert summary["num_growths"] == 1
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in run.model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
