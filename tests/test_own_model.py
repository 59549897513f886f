"""Your own model in a config: `model.name: "my_nets:Net"` (an import path), built with the dataset's shape
keys it takes, grown, checkpointed, resumed to the same weights and exported, from the command line with the
module only in the working directory (as `python -m` finds it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from firefly_descent.models import build_model, model_spec
from firefly_descent.train.checkpoint import list_checkpoints, load_checkpoint

NETS = textwrap.dedent(
    """
    import torch.nn as nn
    import torch.nn.functional as F


    class Net(nn.Module):
        def __init__(self, in_channels=1, num_classes=10, width=5):
            super().__init__()
            self.c1 = nn.Conv2d(in_channels, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.c2 = nn.Conv2d(width, 6, 3, padding=1)
            self.fc = nn.Linear(6, num_classes)

        def forward(self, x):
            x = F.relu(self.bn(self.c1(x)))
            return self.fc(F.relu(self.c2(x)).mean((2, 3)))


    def not_a_module(width=3):
        return [width]

    NOT_CALLABLE = 3
    """
)

CFG = {
    "name": "own",
    "data": {"name": "digits", "batch_size": 128},
    "model": {"name": "my_nets:Net", "kwargs": {"width": 5}},
    "optim": {"name": "sgd", "lr": 0.05},
    "growth": {"method": "firefly", "kwargs": {"budget": "units:4"}, "at": [1, 2]},
    "train": {"epochs": 3, "seed": 0, "tensorboard": False},
    "checkpoint": {"keep_last": 10},
}


def firefly(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")  # the package, not the user's module
    quiet = ["--no-progress"] if args[0] in ("train", "resume") else []
    # -P (3.11+): no working directory on sys.path, as with the `firefly` console script
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return subprocess.run([sys.executable, *safe, "-m", "firefly_descent.cli", *args, *quiet], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    (root / "my_nets.py").write_text(NETS)
    (root / "own.yaml").write_text(yaml.safe_dump(CFG))
    res = firefly(root, "train", "own.yaml", "--out", "run")
    assert res.returncode == 0, res.stderr
    return root


def test_cli_trains_grows_and_exports_a_model_named_by_import_path(project):
    ckpt = load_checkpoint(project / "run")
    assert ckpt["epoch"] == 3 and ckpt["num_growths"] == 2
    assert ckpt["model_state"]["c1.weight"].shape[0] > 5  # grown
    res = firefly(project, "export", "run", "exported")
    assert res.returncode == 0, res.stderr
    script = "import firefly_descent as ff, torch, sys; m = ff.load_export('exported'); print(m.c1.out_channels)"
    out = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{project}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == ckpt["model_state"]["c1.weight"].shape[0]


def test_a_run_of_an_import_path_model_resumes_to_the_same_weights(project, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(project / "run", cut)
    (cut / "summary.json").unlink()
    after_growth = next(p.name for p in list_checkpoints(cut) if p.name.endswith("e0001g.pt"))
    for p in list_checkpoints(cut):
        if p.name > after_growth:
            p.unlink()  # as if killed after the first growth
    assert max(p.name for p in list_checkpoints(cut)).endswith("e0001g.pt")
    elsewhere = firefly(tmp_path, "resume", str(cut))  # from a folder without the module: one line
    assert elsewhere.returncode == 2 and "cannot import 'my_nets'" in elsewhere.stderr
    assert elsewhere.stderr.strip().count("\n") == 0
    res = firefly(project, "resume", str(cut))
    assert res.returncode == 0, res.stderr
    a, b = load_checkpoint(project / "run"), load_checkpoint(cut)
    assert a["epoch"] == b["epoch"] == 3 and a["model_state"].keys() == b["model_state"].keys()
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k


def test_import_path_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_nets", raising=False)
    assert model_spec("my_nets:Net") == {"in_channels": 1, "num_classes": 10, "width": 5}
    assert isinstance(build_model("my_nets:Net", width=3), torch.nn.Module)
    for name, says in [
        ("my_nets:Nope", "has no 'Nope'"),
        ("my_nets:NOT_CALLABLE", "is a int, not a class or function"),
        ("no_such_module_xyz:Net", "cannot import 'no_such_module_xyz'"),
        ("my_nets:", "an import path is 'package.module:ClassOrFunction'"),
    ]:
        with pytest.raises(ValueError, match=says):
            build_model(name)
    with pytest.raises(TypeError, match="built a list, not a torch.nn.Module"):
        build_model("my_nets:not_a_module")
    with pytest.raises(TypeError, match=r"unknown options \['depth'\]"):
        build_model("my_nets:Net", depth=3)


def test_inspect_elsewhere_is_one_line_and_a_closed_pipe_is_no_traceback(project, tmp_path, monkeypatch):
    res = firefly(tmp_path, "inspect", str(project / "run"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "cannot rebuild the checkpoint's model" in res.stderr
    # `firefly inspect RUN | head -1`: the reader has gone; the command ends quietly
    from firefly_descent.cli import main

    monkeypatch.chdir(project)
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w", buffering=1) as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["inspect", "run"]) == 0
        monkeypatch.undo()


def test_a_model_growth_cannot_read_is_refused_before_the_first_epoch(tmp_path, monkeypatch):
    from firefly_descent.train import train
    from firefly_descent.train.config import ConfigError

    (tmp_path / "dyn_nets.py").write_text(textwrap.dedent(
        """
        import torch.nn as nn


        class Net(nn.Module):
            def __init__(self, in_channels=1, num_classes=10):
                super().__init__()
                self.c1, self.fc = nn.Conv2d(in_channels, 4, 3, padding=1), nn.Linear(4, num_classes)

            def forward(self, x):
                h = self.c1(x).relu()
                if h.mean() > 0.1:
                    h = h * 2
                return self.fc(h.mean((2, 3)))
        """
    ))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "dyn_nets", raising=False)
    cfg = {**CFG, "model": {"name": "dyn_nets:Net"}}
    with pytest.raises(ConfigError, match=r"growth cannot analyse this model: .*branches on tensor values"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    static = {**cfg, "growth": {"method": "static"}, "train": {**CFG["train"], "epochs": 1}}
    assert train(static, tmp_path / "static", progress=False)["epochs"] == 1  # without growth it trains


def test_a_model_with_nothing_to_grow_is_refused_before_the_first_epoch(tmp_path):
    from firefly_descent.train import train
    from firefly_descent.train.config import ConfigError

    for method in ("firefly", "random"):
        cfg = {**CFG, "model": {"name": "mlp", "kwargs": {"hidden": []}}, "growth": {**CFG["growth"], "method": method}}
        with pytest.raises(ConfigError, match=r"nothing to grow \('classifier': its units reach the model output\)"):
            train(cfg, tmp_path / method, progress=False)
        assert not (tmp_path / method).exists()
