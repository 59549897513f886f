"""What a newcomer hits first (issue 16): set-up, output paths, file modes, the control recipe, finished
runs, progress lines, plots, exports, threads and a torch-free `firefly --help` (tiny digits MLPs)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from firefly_descent.cli import main

PNGS = ("curves.png", "acc_vs_params.png", "widths.png")


def tiny(**sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "newcomer",
        "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "mlp", "kwargs": {"hidden": [8, 8]}},
        "optim": {"name": "sgd", "lr": 0.05},
        "growth": {"method": "random", "kwargs": {"budget": "units:4"}, "at": [1, 2]},
        "train": {"epochs": 3, "seed": 1},
        "checkpoint": {"keep_last": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def run_main(*args: str) -> tuple[int, str, str]:
    """`main(args)` with stdout/stderr captured as plain (non-terminal) streams."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, mode(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict[str, Any]:
    """One CLI run, grown twice, trained under umask 022 with non-terminal output and progress every batch."""
    tmp = tmp_path_factory.mktemp("newcomer")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny()))
    run = tmp / "run"
    with pytest.MonkeyPatch.context() as mp, umask(0o022):
        mp.setenv("FIREFLY_PROGRESS_SECONDS", "0")
        code, out, err = run_main("train", str(cfg), "--out", str(run))
    assert code == 0, err
    return {"cfg": cfg, "run": run, "out": out, "err": err, "tmp": tmp}


# --------------------------------------------------------------------------- 6, 7: progress lines, plots, done line


def test_progress_lines_when_output_is_not_a_terminal(grown):
    lines = [ln for ln in grown["err"].splitlines() if ": batch " in ln]
    assert any(ln.startswith("epoch 1/3: batch 1/") for ln in lines), grown["err"][:500]
    assert any(ln.startswith("epoch 3/3: batch ") for ln in lines)
    assert all("batch/s" in ln or "s/batch" in ln for ln in lines) and all("loss " in ln for ln in lines)
    assert "ETA" in lines[0]


def test_progress_lines_are_rate_limited():
    from firefly_descent.train.progress import ProgressLines

    now = [0.0]
    buf = io.StringIO()
    p = ProgressLines(100, "epoch 1/2", every=30, stream=buf, clock=lambda: now[0])
    printed = []
    for b in range(1, 101):
        now[0] = b * 1.0  # one batch per second
        printed.append(p.update(b, loss=0.5))
    assert sum(printed) == 3 and [i + 1 for i, x in enumerate(printed) if x] == [30, 60, 90]
    first = buf.getvalue().splitlines()[0]
    assert first == "epoch 1/2: batch 30/100 (30%), 1.0 batch/s, ETA 1m10s, loss 0.5000"


def test_train_writes_plots_and_the_done_line(grown):
    run = grown["run"]
    for png in PNGS:
        data = (run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    log = (run / "train.log").read_text().splitlines()
    assert log[-1].startswith(f"done: {run} | test acc ")
    assert grown["out"].count("done: ") == 1  # once on the console, not twice


def test_widths_in_model_order_at_growth_positions_and_no_empty_panel(tmp_path):
    from firefly_descent.report import RunData, _width_series, write_run_plots

    before = {"features.2": 8, "features.10": 8, "head.1": 4}
    after = {"features.2": 10, "features.10": 9, "head.1": 4}
    metrics = [{"epoch": e, "test_acc": 0.5, "test_loss": 1.0, "train_loss": 1.0, "params": 100} for e in (1, 2, 3)]
    step = {"epoch": 2, "widths_before": before, "widths_after": after, "params_before": 90, "params_after": 100}
    run = RunData(Path("x"), "x", {}, metrics, [step])
    xs, series = _width_series(run)
    assert list(series) == ["features.2", "features.10", "head.1"]  # model order, not string order
    assert xs == [1.0, 2.5, 3.0]  # growth after epoch 2 at x = 2.5, as curves.png marks it
    assert series["features.10"] == [8.0, 9.0, 9.0]

    static = tmp_path / "static"
    static.mkdir()
    (static / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    noop = {"epoch": 2, "widths_before": before, "widths_after": before, "params_before": 90, "params_after": 90}
    (static / "growth.jsonl").write_text(json.dumps(noop) + "\n")  # the static control's no-op step
    paths = write_run_plots(static)
    assert sorted(p.name for p in paths) == ["acc_vs_params.png", "curves.png"]  # no empty widths panel
    assert not (static / "widths.png").exists()


# --------------------------------------------------------------------------- 3: file modes


def test_written_files_respect_the_umask(grown, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(grown["run"], run)
    for p in [grown["run"] / "summary.json", *(grown["run"] / "checkpoints").iterdir()]:
        assert mode(p) == 0o644, (p, oct(mode(p)))
    with umask(0o022):
        assert run_main("export", str(grown["run"]), str(tmp_path / "exp"))[0] == 0
        for name in ("model.safetensors", "architecture.json", "config.yaml"):
            assert mode(tmp_path / "exp" / name) == 0o644, name
        # resume a run whose last epoch is lost: the logs are rewritten from the checkpoint
        newest = sorted((run / "checkpoints").iterdir())[-1]
        newest.unlink()
        (run / "summary.json").unlink()
        code, out, err = run_main("resume", str(run))
        assert code == 0, err
        assert "resuming " in out
    for name in ("metrics.jsonl", "growth.jsonl", "summary.json"):  # rewritten atomically by the resume
        assert mode(run / name) == 0o644, name
    from firefly_descent.io import atomic_write_text

    with umask(0o077):
        atomic_write_text(tmp_path / "private.txt", "x")
        (tmp_path / "shared.txt").write_text("")
        (tmp_path / "shared.txt").chmod(0o664)
        atomic_write_text(tmp_path / "shared.txt", "x")  # an existing file keeps its mode, as open() would
    assert mode(tmp_path / "private.txt") == 0o600 and mode(tmp_path / "shared.txt") == 0o664


# --------------------------------------------------------------------------- 5: finished runs


def test_resuming_a_finished_run_changes_nothing(grown, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(grown["run"], run, copy_function=shutil.copy2)
    before = snapshot(run)
    code, out, err = run_main("resume", str(run))
    assert code == 0, err
    assert out.strip() == f"{run}: run complete (3/3 epochs); nothing to resume"
    assert "resuming " not in out + err and err == ""
    assert snapshot(run) == before


# --------------------------------------------------------------------------- 4: the control recipe


def test_control_recipe_on_a_short_run(grown, tmp_path):
    ctrl = tmp_path / "ctrl"
    code, out, err = run_main(
        "train",
        str(grown["cfg"]),
        "--set",
        "model.name=replayed-architecture",
        "--set",
        f"model.kwargs.run={grown['run']}",
        "--set",
        "growth.method=static",
        "--set",
        "train.epochs=2",  # growth.at=[1, 2] in the config: no longer "outside the run" for static
        "--out",
        str(ctrl),
        "--no-progress",
    )
    assert code == 0, err
    grown_params = json.loads((grown["run"] / "summary.json").read_text())["params"]
    summary = json.loads((ctrl / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["params"] == grown_params


def test_shortened_growth_schedule_says_how_to_fix_it():
    from firefly_descent.train import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("fashion-vgg-firefly", ["train.epochs=5"])
    assert "growth.at: epoch 6 is outside the run" in str(e.value) and "--set growth.at=[2,4]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("fashion-vgg-firefly", ["train.epochs=2"])
    assert "--set growth.method=static" in str(e.value)
    assert load_config("fashion-vgg-firefly", ["growth.method=static", "train.epochs=2"]).train.epochs == 2


# --------------------------------------------------------------------------- 2: output paths


def _path_cases(run: Path, cfg: Path) -> list[tuple[list[str], Path, str]]:
    file_in_way = run / "config.yaml"
    return [
        (["export", str(run), str(file_in_way / "out")], file_in_way / "out", "is a file, not a folder"),
        (["export", str(run), "/sys/exported"], Path("/sys/exported"), "cannot write there"),
        (["export", str(run), "/proc/exported"], Path("/proc/exported"), "does not accept new files"),
        (["report", str(run), "--out", str(file_in_way / "rep")], file_in_way / "rep", "is a file, not a folder"),
        (["report", str(run), "--out", str(file_in_way)], file_in_way, "exists and is not a folder"),
        (["report", str(run), "--out", "/sys/rep"], Path("/sys/rep"), "cannot write there"),
        (["train", str(cfg), "--out", str(file_in_way / "r")], file_in_way / "r", "is a file, not a folder"),
        (["train", str(cfg), "--out", "/proc/run"], Path("/proc/run"), "does not accept new files"),
    ]


def test_output_path_errors_are_one_line_exit_2_before_any_work(grown, monkeypatch):
    import firefly_descent.data as data

    def no_data(*a: Any, **k: Any) -> Any:
        raise AssertionError("the data was loaded before the output path was checked")

    monkeypatch.setattr(data, "load_dataset", no_data)
    before = snapshot(grown["run"])
    for args, target, why in _path_cases(grown["run"], grown["cfg"]):
        code, out, err = run_main(*args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert str(target) in err and why in err, (args, err)
        assert not os.path.lexists(target) or target == grown["run"] / "config.yaml"
    assert snapshot(grown["run"]) == before  # nothing written


def test_check_output_dir_leaves_nothing_behind(tmp_path):
    from firefly_descent.paths import check_output_dir

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 8: exports load back


def test_export_loads_back_into_a_model(grown, tmp_path):
    import firefly_descent as ff
    from firefly_descent.exporting import ExportError
    from firefly_descent.train import load_checkpoint
    from firefly_descent.train.checkpoint import rebuild_model

    exp = tmp_path / "exp"
    assert run_main("export", str(grown["run"]), str(exp))[0] == 0
    model = ff.load_export(exp)
    ckpt = load_checkpoint(grown["run"])
    ref = rebuild_model(ckpt).eval()
    x = ckpt["example_inputs"]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert len(ff.growth_history(model)) == 2
    with pytest.raises(ExportError, match="no architecture.json"):
        ff.load_export(tmp_path)


# --------------------------------------------------------------------------- 10: help without torch


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_help_and_config_errors_do_not_import_torch():
    res = _fresh_python(
        "import sys\n"
        "from firefly_descent.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
        "code = main(['train', 'digits-mlp-firefly', '--set', 'train.epochs=abc'])\n"
        "assert code == 2\n"
        "assert 'torch' not in sys.modules, 'config validation imported torch'\n"
        "import firefly_descent as ff\n"
        "assert 'torch' not in sys.modules\n"
        "ff.widen\n"
        "assert 'torch' in sys.modules\n"
        "print('ok')\n"
    )
    assert res.returncode == 0 and res.stdout.endswith("ok\n"), res.stderr
    assert "FIREFLY_DEBUG" in res.stdout and "error: train.epochs" in res.stderr


# --------------------------------------------------------------------------- 9: threads


def test_threads_default_and_busy_notice(monkeypatch):
    from firefly_descent.train import threads

    saved = torch.get_num_threads()
    try:
        assert threads.choose_threads(None) == min(saved, threads.available_cores())
        assert threads.choose_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    note = threads.busy_notice(2, None)
    assert note is not None and "load 3.0" in note and "train.threads=1" in note and "\n" not in note
    assert threads.busy_notice(1, None) is None and threads.busy_notice(2, 2) is None
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert threads.busy_notice(2, None) is None


# --------------------------------------------------------------------------- 1: a fresh machine's data


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def fresh_machine(tmp_path, monkeypatch) -> Path:
    """No Fashion-MNIST anywhere: no Debian package, no $FIREFLY_DATA_DIR, no ./data, an empty cache."""
    from firefly_descent.data import registry

    monkeypatch.setattr(registry, "_SYSTEM_DIR", tmp_path / "usr-share-datasets")
    monkeypatch.delenv("FIREFLY_DATA_DIR", raising=False)
    monkeypatch.delenv("FIREFLY_OFFLINE", raising=False)
    monkeypatch.setenv("FIREFLY_NO_APT", "1")  # never apt-get from a test (its own test fakes it)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache" / "firefly-descent"


def test_fresh_debian_machine_installs_the_package_as_root(fresh_machine, monkeypatch, tmp_path, capsys):
    """Root with apt-get (this project's machines: Debian's registry, no internet): the loader installs
    dataset-fashion-mnist and reads it from the system folder; torchvision is never asked."""
    import subprocess

    import torchvision.datasets as tvd

    from firefly_descent.data import download, load_dataset

    system = tmp_path / "usr-share-datasets" / "fashion-mnist"
    commands = []

    def fake_run(cmd, **kw):
        commands.append(list(cmd))
        if cmd[:2] == ["apt-get", "install"] and len(commands) > 1:  # the first install fails: no lists yet
            system.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(0)
            for n, stem in ((20, "train"), (5, "t10k")):
                (system / f"{stem}-images-idx3-ubyte.gz").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
                (system / f"{stem}-labels-idx1-ubyte.gz").write_bytes(_idx(rng.integers(0, 10, (n,))))
            return subprocess.CompletedProcess(cmd, 0)
        return subprocess.CompletedProcess(cmd, 100 if cmd[1] == "install" else 0)

    monkeypatch.delenv("FIREFLY_NO_APT")
    monkeypatch.setattr(download.subprocess, "run", fake_run)
    monkeypatch.setattr(download.os, "geteuid", lambda: 0)
    monkeypatch.setattr(download.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(tvd, "FashionMNIST", None)  # would fail if the download path were taken
    b = load_dataset("fashion-mnist")
    assert len(b.train) == 20 and len(b.test) == 5
    assert [c[:2] for c in commands] == [["apt-get", "install"], ["apt-get", "update"], ["apt-get", "install"]]
    assert "installing Debian's dataset-fashion-mnist" in capsys.readouterr().err


def test_fresh_machine_downloads_fashion_mnist_once(fresh_machine, monkeypatch, capsys):
    import torchvision.datasets as tvd

    from firefly_descent.data import load_dataset

    calls = []

    class FakeFashionMNIST:  # writes what torchvision's download leaves: <root>/FashionMNIST/raw/*.gz
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, train, download))
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(0)
            n, stem = (30, "train") if train else (10, "t10k")
            (raw / f"{stem}-images-idx3-ubyte.gz").write_bytes(_idx(rng.integers(0, 256, (n, 28, 28))))
            (raw / f"{stem}-labels-idx1-ubyte.gz").write_bytes(_idx(rng.integers(0, 10, (n,))))

    monkeypatch.setattr(tvd, "FashionMNIST", FakeFashionMNIST)
    b = load_dataset("fashion-mnist")
    assert len(b.train) == 30 and len(b.test) == 10
    assert [c[1:] for c in calls] == [(True, True), (False, True)] and calls[0][0] == str(fresh_machine)
    err = capsys.readouterr().err
    assert "downloading it with torchvision" in err and "apt-get install dataset-fashion-mnist" in err
    assert load_dataset("fashion-mnist").meta["source"] == str(fresh_machine / "FashionMNIST" / "raw")
    assert len(calls) == 2  # the second load found the cache


def test_fresh_machine_without_network_gets_one_line(fresh_machine, monkeypatch, tmp_path):
    def refuse(*a: Any, **k: Any) -> Any:
        raise urllib.error.URLError("network unreachable (test)")

    def no_socket(*a: Any, **k: Any) -> Any:
        raise OSError("sockets are off in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", no_socket)
    code, out, err = run_main("train", "fashion-vgg-firefly", "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: data: Fashion-MNIST not found in ") and "Traceback" not in err
    assert "the download into" in last and "failed" in last and "apt-get install dataset-fashion-mnist" in last
    assert not (tmp_path / "run").exists()


def test_offline_switch_refuses_the_download(fresh_machine, monkeypatch):
    from firefly_descent.data import DatasetError, load_dataset

    monkeypatch.setenv("FIREFLY_OFFLINE", "1")
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist")
    assert "downloads are off (FIREFLY_OFFLINE is set)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="not found in /nowhere"):
        load_dataset("fashion-mnist", "/nowhere")  # an explicit root never downloads
