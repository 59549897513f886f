"""Your own data as arrays in one file (`data: {name: arrays, root: FILE}`, `firefly_descent/data/arrays.py`):
.npz and torch.save files, Keras key names, images and tables, classification and regression, one-line errors,
and a run that trains and grows on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from firefly_descent.data import load_dataset
from firefly_descent.data.errors import DatasetError
from firefly_descent.train import train


def _images(path: Path, keras: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (60, 1, 6, 6), dtype=np.uint8),
        "train_y": rng.integers(0, 3, 60),
        "test_x": rng.integers(0, 256, (20, 1, 6, 6), dtype=np.uint8),
        "test_y": rng.integers(0, 3, 20),
    }
    if keras:
        arrays = {{"train_x": "x_train", "train_y": "y_train", "test_x": "x_test", "test_y": "y_test"}[k]: v
                  for k, v in arrays.items()}
    np.savez(path, **arrays, classes=np.array(["a", "b", "c"]))
    return path


def test_npz_images_load_as_a_classification_dataset(tmp_path):
    for keras in (False, True):
        b = load_dataset("arrays", _images(tmp_path / f"d{keras}.npz", keras), val_fraction=0.25, seed=0)
        assert b.num_classes == 3 and b.input_shape == (1, 6, 6) and b.classes == ("a", "b", "c")
        assert (len(b.train), len(b.val), len(b.test)) == (45, 15, 20)
        x, y = b.train[0]
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert b.train.inputs.dtype == torch.uint8  # images: scaled to [0, 1] on access
        mean = (b.train.inputs.double() / 255).mean().item()
        assert b.meta["mean"][0] == pytest.approx(mean, abs=1e-9)  # statistics of the training split only


def test_torch_file_of_float_targets_is_regression(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    torch.save({"train_x": x[:30], "train_y": x[:30, :2].sum(1, keepdim=True), "test_x": x[30:],
                "test_y": x[30:, :2].sum(1, keepdim=True)}, tmp_path / "reg.pt")
    b = load_dataset("npz", tmp_path / "reg.pt")  # alias
    assert b.num_classes == 0 and b.input_shape == (5,) and b.train.targets.shape == (30, 1)


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ({"train_x": np.zeros((4, 3)), "train_y": np.zeros(4, int), "test_x": np.zeros((2, 3))},
         "no test_y (or y_test)"),
        ({"train_x": np.zeros((4, 3)), "train_y": np.zeros(3, int), "test_x": np.zeros((2, 3)),
          "test_y": np.zeros(2, int)}, "train_x has 4 rows but train_y has 3"),
        ({"train_x": np.zeros((4, 3)), "train_y": np.zeros(4, int), "test_x": np.zeros((2, 4)),
          "test_y": np.zeros(2, int)}, "train_x rows are (3,), test_x rows (4,)"),
        ({"train_x": np.zeros((4, 3)), "train_y": np.array([0, 1, -1, 0]), "test_x": np.zeros((2, 3)),
          "test_y": np.zeros(2, int)}, "class labels must lie in"),
        ({"train_x": np.zeros(4), "train_y": np.zeros(4, int), "test_x": np.zeros(2), "test_y": np.zeros(2, int)},
         "must be (N, features) or (N, C, ...)"),
    ],
)
def test_malformed_files_are_one_line(tmp_path, arrays, says):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError) as err:
        load_dataset("arrays", tmp_path / "bad.npz")
    assert says in str(err.value) and "\n" not in str(err.value) and "bad.npz" in str(err.value)


def test_missing_root_folder_and_wrong_suffix_are_one_line(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    (tmp_path / "junk.npz").write_text("not a zip")
    for root, says in [(None, "set data.root"), (tmp_path, "not a folder"), (tmp_path / "x.csv", "not '.csv'"),
                       (tmp_path / "nope.npz", "no such file"), (tmp_path / "junk.npz", "not a readable .npz")]:
        with pytest.raises(DatasetError) as err:
            load_dataset("arrays", root)
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_run_trains_and_grows_on_an_arrays_file(tmp_path):
    path = _images(tmp_path / "d.npz")
    cfg = {
        "name": "arrays",
        "data": {"name": "arrays", "root": str(path), "batch_size": 16},
        "model": {"name": "mlp", "kwargs": {"hidden": [4]}},
        "optim": {"name": "sgd", "lr": 0.05},
        "growth": {"method": "random", "kwargs": {"budget": "units:2"}, "at": [1]},
        "train": {"epochs": 2, "seed": 0, "tensorboard": False},
    }
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["num_growths"] == 1 and summary["params"] > 0


class _Bag(torch.nn.Module):
    """A bag of token embeddings, then a hidden layer: the classic text classifier."""

    def __init__(self, vocab: int = 12, dim: int = 8, hidden: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, hidden)
        self.out = torch.nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(tokens).mean(1))))


def test_integer_inputs_are_token_ids_and_a_text_classifier_grows(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (400, 7), generator=g, dtype=torch.int32)
    labels = (tokens == 3).any(1).long()
    torch.save({"train_x": tokens[:300], "train_y": labels[:300], "test_x": tokens[300:], "test_y": labels[300:]},
               tmp_path / "text.pt")
    b = load_dataset("arrays", tmp_path / "text.pt")
    assert b.meta["mean"] is None and b.train.inputs.dtype == torch.int64
    x, _ = b.train[0]
    assert x.dtype == torch.int64 and torch.equal(x, tokens[0].long())  # as they are: not scaled or normalised
    from firefly_descent.models import register_model

    register_model("test-token-bag", _Bag)
    cfg = {
        "name": "text",
        "data": {"name": "arrays", "root": str(tmp_path / "text.pt"), "batch_size": 32},
        "model": {"name": "test-token-bag"},
        "optim": {"name": "adam", "lr": 0.02},
        "growth": {"method": "firefly", "kwargs": {"budget": "units:3"}, "at": [2]},
        "train": {"epochs": 4, "seed": 0, "tensorboard": False},
    }
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["num_growths"] == 1 and summary["params"] > 142, summary  # 142 before growth
    assert summary["final_test_acc"] > 0.75, summary  # the majority class is 0.55


def test_a_regression_run_reports_its_test_loss(tmp_path, monkeypatch):
    from firefly_descent import report

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    torch.save({"train_x": x[:150], "train_y": x[:150, :1] * 2, "test_x": x[150:], "test_y": x[150:, :1] * 2},
               tmp_path / "reg.pt")
    cfg = {
        "name": "reg",
        "data": {"name": "arrays", "root": str(tmp_path / "reg.pt"), "batch_size": 32},
        "model": {"name": "mlp", "kwargs": {"hidden": [4]}},
        "optim": {"name": "adam", "lr": 0.01},
        "growth": {"method": "random", "kwargs": {"budget": "units:2"}, "at": [1]},
        "train": {"epochs": 2, "seed": 0, "tensorboard": False},
    }
    summary = train(cfg, tmp_path / "run", progress=False)
    import matplotlib.axes

    labels: list[str] = []
    real = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, text, *a, **k: labels.append(text)
                        or real(ax, text, *a, **k))
    report.make_report([tmp_path / "run"], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "final test loss" in md and f"{summary['final_test_loss']:.4f}" in md
    assert labels[0] == "test loss"  # accuracy-vs-parameters plots the loss when no run has an accuracy
