"""`firefly train --nproc` / `firefly resume --nproc` end to end through torch.distributed.run.

Slow (fresh interpreters for the launcher and every rank); the in-process equivalence, kill and resume
tests are in test_distributed.py. The CUDA variants run only where GPUs are present (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firefly_descent.train.checkpoint import list_checkpoints, load_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
SETS = [
    "data.train_subset=256",
    "data.test_subset=128",
    "train.epochs=3",
    "growth.every=null",
    "growth.at=[1]",
    "train.tensorboard=false",
]


def _firefly(*args: str, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "firefly_descent.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _sets(device: str) -> list[str]:
    out = []
    for s in [*SETS, f"train.device={device}"]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_cli_nproc_2_trains_and_grows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _firefly("train", "digits-mlp-firefly", "--nproc", "2", "--out", str(run), "--no-progress", *_sets("cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    done = [line for line in r.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "growths 1" in done[0]  # only rank 0 printed the summary
    log = (run / "train.log").read_text()
    assert "2 processes" in log and log.count("epoch 3/3") == 1  # one writer
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    assert ckpt["epoch"] == 3 and ckpt["num_growths"] == 1


def test_cli_resume_nproc_refuses_a_missing_run_without_launching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from firefly_descent.cli import main

    assert main(["resume", str(tmp_path / "nope"), "--nproc", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such run directory"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nccl)")
def test_cli_nproc_2_over_nccl_grows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _firefly("train", "digits-mlp-firefly", "--nproc", "2", "--out", str(run), "--no-progress", *_sets("cuda"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "device cuda:0" in log and "2 processes" in log
    assert load_checkpoint(list_checkpoints(run)[-1])["num_growths"] == 1
