"""Issue 25, the items that live in train/: folders a run or a report must not write into (1), portable
replayed-architecture runs (4), Ctrl-C on ``--nproc`` (5), TensorBoard off by default (11), resume of a
read-only run folder (14), step milestones that cannot act (15), incomplete runs in reports (17) and
``--nproc`` noise (18)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import firefly_descent as ff
from firefly_descent.cli import main
from firefly_descent.models import build_model
from firefly_descent.train import launcher, load_config, rundir, train
from firefly_descent.train.checkpoint import list_checkpoints, load_checkpoint
from firefly_descent.train.schedule import inert_milestones, milestone_notice

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny(**sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "nc2",
        "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "schedule": {"name": "cosine"},
        "growth": {"method": "random", "at": [1], "kwargs": {"budget": 0.5}},
        "train": {"epochs": 2, "seed": 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def run_main(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class StopAfter:
    """A callback that interrupts a run after epoch `n` (as Ctrl-C would)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_epoch_end(self, row: dict, model: torch.nn.Module) -> None:
        if row["epoch"] == self.n:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished grown run, and a run of 3 epochs interrupted after its first."""
    tmp = tmp_path_factory.mktemp("nc2")
    train(tiny(), tmp / "grown", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(train={"epochs": 3}, growth={"at": [2]}), tmp / "cut", progress=False, callbacks=[StopAfter(1)])
    return {"tmp": tmp, "grown": tmp / "grown", "cut": tmp / "cut"}


# --------------------------------------------------------------------------- 1: no silent overwrite


@pytest.mark.parametrize(
    "kind", ["export", "report"], ids=["an export folder", "a report folder"]
)
def test_train_refuses_a_folder_holding_other_files(tmp_path, capsys, kind):
    out = tmp_path / kind
    out.mkdir()
    names = ["model.safetensors", "architecture.json", "config.yaml"] if kind == "export" else [
        "report.md", "summary.json", "curves.png"]
    for name in names:
        (out / name).write_text(f"{name} content")
    before = files_of(out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny()))
    code, _, err = run_main("train", str(cfg), "--out", str(out), "--no-progress", capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run directory {out}: holds files that are not this run's")
    assert files_of(out) == before  # nothing replaced, nothing added


def test_a_folder_of_a_run_killed_before_its_first_checkpoint_may_be_started_over(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "growth.jsonl", "train.log"):
        (out / name).write_text("")
    assert rundir.check_new_run_dir(out) == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files that are not this run's \(notes.txt\)"):
        rundir.check_new_run_dir(out)
    assert rundir.check_new_run_dir(out, restart=True) == out  # resuming: the folder is the run's own


def test_report_never_writes_into_a_run_directory(runs, capsys):
    before = files_of(runs["grown"])
    code, _, err = run_main("report", str(runs["grown"]), "--out", str(runs["grown"]), capsys=capsys)
    assert code == 2
    assert err.strip() == f"error: --out {runs['grown']}: is a training run's folder; write the report somewhere else"
    assert files_of(runs["grown"]) == before


# --------------------------------------------------------------------------- 4: replayed-architecture is portable


def test_replayed_architecture_run_holds_its_history_and_works_from_any_directory(runs, tmp_path, capsys, monkeypatch):
    grown_ckpt = load_checkpoint(runs["grown"])
    history = grown_ckpt["growth_history"]
    assert history and grown_ckpt["num_growths"] == 1
    monkeypatch.chdir(runs["tmp"])  # the control names the grown run by a relative path
    sets = ["--set", "model.name=replayed-architecture", "--set", "model.kwargs.run=grown",
            "--set", "growth.method=static", "--set", "train.epochs=1"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny()))
    code, _, err = run_main("train", str(cfg), *sets, "--out", str(tmp_path / "ctrl"), "--no-progress", capsys=capsys)
    assert code == 0, err
    ctrl = tmp_path / "ctrl"
    written = yaml.safe_load((ctrl / "config.yaml").read_text())["model"]["kwargs"]
    assert "run" not in written and written["history"] == history
    assert written["base"] == "mlp" and written["base_kwargs"] == grown_ckpt["model"]["kwargs"]
    monkeypatch.chdir(tmp_path / "ctrl")  # somewhere the relative path means nothing
    assert not Path("grown").exists()
    code, out, err = run_main("inspect", str(ctrl), capsys=capsys)
    assert code == 0, err
    grown_params = sum(p.numel() for p in build_model("replayed-architecture", **written).parameters())
    assert f"params      {grown_params:,}" in out
    assert grown_params == json.loads((runs["grown"] / "summary.json").read_text())["params"]
    code, _, err = run_main("export", str(ctrl), str(tmp_path / "exp"), capsys=capsys)
    assert code == 0, err
    model = ff.load_export(tmp_path / "exp")
    assert sum(p.numel() for p in model.parameters()) == grown_params
    state = load_checkpoint(ctrl)["model_state"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


# --------------------------------------------------------------------------- 11: TensorBoard


def test_tensorboard_is_off_by_default_and_said_once_when_missing(tmp_path, capsys, monkeypatch):
    assert load_config(tiny()).train.tensorboard is False
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.setattr(rundir, "_said_tensorboard_missing", False)
    for name in ("a", "b"):
        rundir.RunDir(tmp_path / name).open_tensorboard(True)
    err = capsys.readouterr().err
    assert err.count("notice: train.tensorboard is on but tensorboard is not installed") == 1
    rundir.RunDir(tmp_path / "c").open_tensorboard(False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- 14: read-only run folders


def test_resume_refuses_a_run_folder_it_cannot_write_with_one_line(runs, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(runs["cut"], run)
    before = files_of(run)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse new entries as a read-only one does
        real = tempfile.mkdtemp

        def refuse(*a: Any, **kw: Any) -> str:
            if Path(kw.get("dir", "")).resolve() == run.resolve():
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(*a, **kw)

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    else:
        run.chmod(0o555)
    try:
        code, out, err = run_main("resume", str(run), "--no-progress", capsys=capsys)
    finally:
        run.chmod(0o755)
    assert code == 2
    assert err.strip() == f"error: run directory {run}: cannot write there: Permission denied; choose another path"
    assert out == "" and files_of(run) == before


# --------------------------------------------------------------------------- 15: step milestones


def test_milestones_that_cannot_act_are_named(tmp_path, capsys):
    two = load_config(tiny(schedule={"name": "step", "milestones": [0.5, 0.75]}, train={"epochs": 8},
                           growth={"at": [2, 4, 6]}))
    assert inert_milestones(two) == [0.75]  # 2-epoch phases: the LR steps at epoch 1 of 2 only
    notice = milestone_notice(two)
    assert notice is not None and "0.75 never take effect" in notice and "longest LR phase is 2 epoch(s)" in notice
    four = load_config(tiny(schedule={"name": "step", "milestones": [0.5, 0.75]}, train={"epochs": 8},
                            growth={"at": [4]}))
    assert inert_milestones(four) == [] and milestone_notice(four) is None  # 0.75 of 4 epochs is epoch 3
    once = load_config(tiny(schedule={"name": "step", "milestones": [0.5, 0.75], "restart_after_growth": False},
                            train={"epochs": 3}))
    assert inert_milestones(once) == [0.75]  # one 3-epoch phase: 2/3 < 0.75
    for name in ("fashion-vgg-firefly", "fashion-vgg-static", "fashion-vgg-net2net", "fashion-vgg-random"):
        assert inert_milestones(load_config(name)) == []
    train(tiny(schedule={"name": "step", "milestones": [0.5, 0.75]}), tmp_path / "r", progress=False)
    err = capsys.readouterr().err
    assert "notice: schedule.milestones 0.5, 0.75 never take effect" in err  # 1-epoch phases: neither acts
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.1, 0.1]  # what the notice says: the rate never stepped


# --------------------------------------------------------------------------- 17: incomplete runs in reports


def test_report_says_a_run_is_incomplete(runs, tmp_path, capsys):
    code, out, err = run_main("report", str(runs["grown"]), str(runs["cut"]), "--out", str(tmp_path / "rep"),
                              capsys=capsys)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| cut |"))
    assert "| 1 of 3 (incomplete) |" in row
    assert next(line for line in out.splitlines() if line.startswith("| grown |")).split(" | ")[2] == "2"
    assert "note: cut is incomplete (1 of 3 epochs)" in out
    rows = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert [(r["epochs"], r["planned_epochs"], r["complete"]) for r in rows] == [(2, 2, True), (1, 3, False)]


# --------------------------------------------------------------------------- 18: --nproc noise


def test_resume_nproc_of_a_finished_run_starts_no_processes(runs, capsys, monkeypatch):
    def no_torchrun(args: Any) -> None:
        raise AssertionError("torchrun started")

    monkeypatch.setattr(launcher, "run", no_torchrun)
    code, out, err = run_main("resume", str(runs["grown"]), "--nproc", "2", capsys=capsys)
    assert code == 0, err
    assert out.strip() == f"{runs['grown']}: run complete (2/2 epochs); nothing to resume"


def test_launch_gives_workers_torchruns_thread_default_without_its_banner(monkeypatch):
    seen: dict[str, Any] = {}

    def fake_run(args: Any) -> None:
        seen["omp"] = os.environ.get("OMP_NUM_THREADS")
        seen["launched"] = os.environ.get(launcher.LAUNCHED_ENV)
        seen["nproc"] = args.nproc_per_node

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launcher, "run", fake_run)
    assert launcher.launch(["train", "x"], 2) == 0
    assert seen == {"omp": "1", "launched": "1", "nproc": "2"}
    assert launcher.LAUNCHED_ENV not in os.environ  # the launcher itself still prints `interrupted`


# --------------------------------------------------------------------------- 5: Ctrl-C on --nproc 2


@pytest.mark.slow
def test_ctrl_c_on_nproc_2_prints_interrupted_and_exits_130(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "firefly_descent.cli", "train", "digits-mlp-firefly", "--nproc", "2", "--out", str(run),
         "--no-progress", "--set", "train.epochs=500", "--set", "growth.every=null", "--set", "growth.at=[1]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    t0 = time.time()
    metrics = run / "metrics.jsonl"
    while time.time() - t0 < 240 and not (metrics.is_file() and metrics.stat().st_size > 0) and p.poll() is None:
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()[1][-2000:]
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the launcher and every rank get SIGINT
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert err.strip() == "interrupted"  # no torch SignalException traceback, no OMP_NUM_THREADS banner
    assert "2 processes" in out and list_checkpoints(run)  # the run is resumable
