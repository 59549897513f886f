"""What a newcomer hits, round two (issue 25): Firefly's BatchNorm handling as the docs say it, README numbers
checked against docs/default-run, one-line errors for bad config files, loading errors, path mix-ups and
image sizes, the busy-machine notice of `firefly search`, and docs that match the code (tiny digits MLPs)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import firefly_descent as ff
from firefly_descent.cli import main
from firefly_descent.errors import GrowthError
from firefly_descent.exporting import ExportError, export_model, load_export
from firefly_descent.train import train
from firefly_descent.train.checkpoint import CheckpointError, load_checkpoint
from firefly_descent.train.threads import busy_notice

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEFAULT_RUN = ROOT / "docs" / "default-run"


def run_main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def bn_mlp(**growth: Any) -> dict[str, Any]:
    """A digits MLP with BatchNorm grown once by Firefly after epoch 1 (4 new units)."""
    return {
        "name": "round2",
        "data": {"name": "digits", "batch_size": 128},
        "model": {"name": "mlp", "kwargs": {"hidden": [6, 6], "norm": "batch"}},
        "optim": {"name": "sgd", "lr": 0.05},
        "growth": {"method": "firefly", "kwargs": {"budget": "units:4"}, "at": [1], **growth},
        "train": {"epochs": 2, "seed": 0, "tensorboard": False},
    }


def growth_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "growth.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def firefly_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("round2") / "run"
    train(bn_mlp(), run, progress=False)
    return run


# ---------------------------------------------------------------- 2: Firefly and BatchNorm calibration


def test_firefly_default_calibrates_nothing_and_the_config_says_null(firefly_run):
    [rec] = growth_records(firefly_run)
    assert rec["method"] == "firefly[default]" and rec["params_after"] > rec["params_before"]
    assert rec["bn_channels_calibrated"] == 0 and rec["bn_layers_refreshed"] == 2
    assert yaml.safe_load((firefly_run / "config.yaml").read_text())["growth"]["calibrate_new_bn"] is None


def test_calibrate_true_is_refused_for_firefly_batch_mode_before_anything_is_written(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(bn_mlp(calibrate_new_bn=True)))
    code, _, err = run_main("train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress")
    line = one_line_error(err)
    assert code == 2 and line.startswith("error: growth.calibrate_new_bn: firefly with bn_mode 'batch'")
    assert "growth.kwargs.bn_mode: frozen" in line
    assert not (tmp_path / "run").exists()


def test_a_run_saved_with_calibrate_true_still_resumes(firefly_run, tmp_path):
    """Runs made before the refusal saved `calibrate_new_bn: true` (the old default) in their checkpoints."""
    from firefly_descent.train import resume

    run = tmp_path / "old"
    shutil.copytree(firefly_run, run)
    ckpts = sorted((run / "checkpoints").glob("*.pt"))
    first = ckpts[0]
    for later in ckpts[1:]:
        later.unlink()
    (run / "summary.json").unlink()
    ckpt = torch.load(first, weights_only=True)
    assert ckpt["epoch"] == 1
    ckpt["config"]["growth"]["calibrate_new_bn"] = True
    torch.save(ckpt, first)
    summary = resume(run, progress=False)
    original = json.loads((firefly_run / "summary.json").read_text())
    assert summary["final_test_loss"] == original["final_test_loss"] and summary["params"] == original["params"]


@pytest.mark.parametrize(("calibrate", "expect_calibrated"), [(None, True), (True, True), (False, False)])
def test_calibrate_key_acts_for_firefly_frozen_mode(tmp_path, calibrate, expect_calibrated):
    growth: dict[str, Any] = {"kwargs": {"budget": "units:4", "bn_mode": "frozen"}}
    if calibrate is not None:
        growth["calibrate_new_bn"] = calibrate
    train(bn_mlp(**growth), tmp_path / "run", progress=False)
    [rec] = growth_records(tmp_path / "run")
    new_units = sum((rec["units_added"] or {}).values()) + sum((rec["units_split"] or {}).values())
    assert rec["safety"]["outcome"] in ("accepted", "shrunk") and new_units == 4
    # every new unit of a BatchNorm'd group has one channel to calibrate (two hidden layers, both normalised)
    assert rec["bn_channels_calibrated"] == (4 if expect_calibrated else 0)


def test_example_no_longer_calibrates_by_hand():
    text = (ROOT / "examples" / "grow_fashion_cnn.py").read_text()
    assert "calibrate_new_batchnorm" not in text and 'bn_mode="batch"' in text


def test_docs_say_firefly_batch_mode_does_not_calibrate():
    flat = " ".join(README.split())
    assert 'except Firefly with its default `bn_mode="batch"`' in flat
    arch = " ".join((ROOT / "docs" / "architecture.md").read_text().split())
    assert "old weights and BatchNorm statistics frozen" not in arch
    assert '`bn_mode="batch"`, the default, normalises with batch statistics' in arch
    assert "calibrated after each growth (`growth.calibrate_new_bn`)" not in (DEFAULT_RUN / "README.md").read_text()


# ---------------------------------------------------------------- 6: README numbers from docs/default-run


def test_readme_first_growth_numbers_are_the_default_runs():
    m = re.search(r"in the default run, ([\d,]+) → ([\d,]+) parameters, \+(\d+) %, at the first growth", README)
    assert m, "the README's first-growth sentence"
    before, after, pct = int(m[1].replace(",", "")), int(m[2].replace(",", "")), int(m[3])
    growths = [json.loads(x) for x in (DEFAULT_RUN / "run-growth.jsonl").read_text().splitlines() if x.strip()]
    first = growths[0]
    assert (before, after) == (first["params_before"], first["params_after"])
    assert pct == round(100 * (after / before - 1))
    summary = json.loads((DEFAULT_RUN / "run-summary.json").read_text())
    assert len(growths) == summary["num_growths"] and growths[-1]["params_after"] == summary["params"]
    metrics = [json.loads(x) for x in (DEFAULT_RUN / "run-metrics.jsonl").read_text().splitlines() if x.strip()]
    assert metrics[0]["params"] == before and metrics[-1]["test_acc"] == summary["final_test_acc"]
    assert len(metrics) == summary["epochs"] and metrics[-1]["params"] == summary["params"]
    # the docs' own README quotes every growth, generated from the same file
    assert f"{before:,} → {after:,} (+{pct} %)" in (DEFAULT_RUN / "README.md").read_text()
    assert all(g["bn_channels_calibrated"] == 0 for g in growths)  # what the docs say of Firefly's default


# ---------------------------------------------------------------- 8, 13: config files and run directories


def test_config_that_is_not_utf8_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_bytes(b"data:\n \xff\n")
    code, _, err = run_main("train", str(bad), "--out", str(tmp_path / "run"))
    expected = f"error: {bad}: not UTF-8 text (byte 0xff on line 2); save the file as UTF-8"
    assert code == 2 and one_line_error(err) == expected
    assert not (tmp_path / "run").exists()


def test_train_on_a_directory_and_resume_on_a_file_say_what_is_wrong(tmp_path, firefly_run):
    folder = tmp_path / "folder"
    folder.mkdir()
    code, _, err = run_main("train", str(folder))
    assert code == 2 and one_line_error(err) == f"error: config: {str(folder)!r} is a directory, not a YAML config file"
    code, _, err = run_main("train", str(firefly_run))  # a run directory: say how to continue it
    assert code == 2 and one_line_error(err).endswith(f"a run directory: `firefly resume {firefly_run}` continues it")
    cfg = firefly_run / "config.yaml"
    code, _, err = run_main("resume", str(cfg))
    assert code == 2 and one_line_error(err) == f"error: {cfg}: is a file, not a run directory (a run's --out folder)"
    code, _, err = run_main("resume", str(tmp_path / "nowhere"))
    assert code == 2 and one_line_error(err) == f"error: {tmp_path / 'nowhere'}: no such run directory"


# ---------------------------------------------------------------- 9: loading errors


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture()
def saved(tmp_path) -> Path:
    model = small()
    ff.widen(model, torch.randn(2, 4), {"0": 2}, mode="split")
    path = tmp_path / "grown.pt"
    ff.save(model, str(path))
    return path


def test_load_corrupt_files_say_what_happened_without_unsafe_advice(saved, tmp_path):
    truncated, garbage, objects = tmp_path / "truncated.pt", tmp_path / "garbage.pt", tmp_path / "objects.pt"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    garbage.write_bytes(b"hello world\x80\x03")
    objects.write_bytes(pickle.dumps({"layer": nn.Linear(2, 2)}, protocol=2))
    expected = {
        truncated: f"{truncated}: is corrupt or truncated (RuntimeError); write it again, or copy it again",
        garbage: f"{garbage}: is not a file written by torch.save",
        objects: f"{objects}: holds Python objects beyond tensors and plain data",
    }
    for path, start in expected.items():
        with pytest.raises(GrowthError) as e:
            ff.load(str(path), build=small)
        assert str(e.value).startswith(start) and "weights_only" not in str(e.value) and "\n" not in str(e.value)
    for args in (("inspect", str(truncated)), ("export", str(objects), str(tmp_path / "out"))):
        code, _, err = run_main(*args)
        line = one_line_error(err)
        assert code == 2 and "weights_only" not in line and line.startswith(f"error: {args[1]}: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_load_of_a_cli_checkpoint_says_how_to_load_it(firefly_run):
    ckpt = sorted((firefly_run / "checkpoints").glob("*.pt"))[-1]
    with pytest.raises(GrowthError, match=r"is a training checkpoint of `firefly train`.*firefly export RUN_DIR"):
        ff.load(str(ckpt), build=small)


def test_load_checkpoint_of_a_save_file_says_how_to_load_it(saved):
    with pytest.raises(CheckpointError, match=r"a firefly_descent.save file, not a training checkpoint; load it with"):
        load_checkpoint(saved)


def test_load_with_the_wrong_constructor_says_so(saved, tmp_path):
    with pytest.raises(GrowthError) as e:  # the history names a layer this model lacks
        ff.load(str(saved), build=lambda: nn.Sequential(nn.Linear(4, 3)))
    msg = str(e.value)
    assert msg.startswith(f"{saved}: the model that build() makes does not fit the saved one (")
    assert msg.endswith("; pass as build the constructor of the model that was saved") and "re-analyse" not in msg
    with pytest.raises(GrowthError, match=r"does not fit the saved one \(Error\(s\) in loading state_dict.*mismatch"):
        ff.load(str(saved), build=lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 7)))
    model = small()
    ff.widen(model, torch.randn(2, 4), {"0": 2}, mode="split")
    export_model(model, tmp_path / "exp")
    with pytest.raises(ExportError, match=r"growth history does not replay.*pass as build the constructor"):
        load_export(tmp_path / "exp", build=lambda: nn.Sequential(nn.Linear(4, 3)))
    (tmp_path / "exp" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match=r"model.safetensors: unreadable \(\w+\); export again"):
        load_export(tmp_path / "exp", build=small)


# ---------------------------------------------------------------- 10: firefly search on a busy machine


def test_busy_notice_names_the_key_to_set(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 5.0, 5.0))
    assert busy_notice(2, None).endswith("--set train.threads=1 avoids it")
    assert busy_notice(2, None, "threads").endswith("--set threads=1 avoids it")
    assert busy_notice(2, 2, "threads") is None and busy_notice(1, None, "threads") is None


def test_search_prints_the_busy_notice(monkeypatch, tmp_path, capsys):
    from firefly_descent.search import runner

    monkeypatch.setattr("os.getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(runner.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(runner, "run_seed", lambda cfg, seed, out, progress: {"seed": seed})
    cfg = {"name": "busy", "method": {"name": "random", "kwargs": {"trials": 1}}, "device": "cpu"}
    runner.run_search(cfg, tmp_path / "s")
    err = capsys.readouterr().err
    assert err.count("note: this machine is busy") == 1 and "--set threads=1 avoids it" in err
    monkeypatch.setattr(runner.torch, "set_num_threads", lambda n: None)
    runner.run_search({**cfg, "threads": 2}, tmp_path / "s2")  # an explicit count: no notice
    assert "busy" not in capsys.readouterr().err


def test_cellsearch_docs_name_every_top_level_search_key():
    from firefly_descent.search.config import SearchConfig

    doc = (ROOT / "docs" / "cellsearch.md").read_text()
    for f in dataclasses.fields(SearchConfig):
        assert re.search(rf"^{f.name}:", doc, re.M), f.name
    assert "--set threads=1" in doc


# ---------------------------------------------------------------- 12: image sizes


def test_imagefolder_size_error_names_the_config_key(tmp_path):
    from PIL import Image

    from firefly_descent.data import DatasetError, load_dataset

    for split in ("train", "test"):
        for c, size in (("a", (6, 6)), ("b", (7, 5))):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("L", size).save(tmp_path / split / c / "0.png")
    with pytest.raises(DatasetError) as e:
        load_dataset("imagefolder", tmp_path)
    assert "resize them with image_size=N (in a run config: data.kwargs.image_size: N)" in str(e.value)
    assert "pass image_size" not in str(e.value)


# ---------------------------------------------------------------- 16, 19, 20: docs that match the code


def test_contracts_rows_are_unique_and_name_what_exists():
    rows = [line for line in (ROOT / "docs" / "CONTRACTS.md").read_text().splitlines() if line.startswith("| `")]
    modules = [row.split("|")[1].strip() for row in rows]
    assert len(modules) == len(set(modules)) and "`firefly_descent.train`" in modules
    analysis = next(row for row in rows if row.startswith("| `firefly_descent.analysis`"))
    import firefly_descent.analysis as analysis_module

    for name in re.findall(r"`(register_\w+)`", analysis):
        assert hasattr(analysis_module, name), name
    assert not hasattr(analysis_module, "exclude") and "`exclude` |" not in analysis


def test_shared_cpus_section_is_about_threads_only():
    arch = (ROOT / "docs" / "architecture.md").read_text()
    section = arch[arch.index("## Shared CPUs") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    assert "transformer" not in section.lower() and "intra-op" in section


def test_readme_examples_write_under_runs_and_the_setup_commands_stay():
    commands = README[README.index("## Command line") :].split("```")[1]
    for line in commands.splitlines():
        words = line.split("#")[0].split()
        if "--out" in words:
            assert words[words.index("--out") + 1].startswith("runs/"), line
        if words[:2] == ["firefly", "export"]:
            assert words[3].startswith("runs/"), line
    for m in re.finditer(r"load_export\(\"([^\"]+)\"", README):
        assert m[1].startswith("runs/")
    first_block = README.split("```bash\n")[1].split("```")[0]
    setup = 'pip install -e ".[test]" && firefly train fashion-vgg-firefly --out runs/default'
    assert first_block == f"{setup}\npython -m pytest -q\n"
    assert "--index-url https://download.pytorch.org/whl/cpu" in README
    assert "torchvision 0.29.1 is built against torch 2.14.1" in README
