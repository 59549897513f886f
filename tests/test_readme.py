"""The README's python code runs as written.

Every ```python block of README.md is executed, each in a fresh namespace holding the names the README
leaves to the reader: a small CNN class `MyModel` (with `features.0` and `layer1`, as the snippets
name them), an instance `model`, `example_inputs`, an optimizer (`opt`/`optimizer`), a `train_loader`,
plus `torch` and `ff` (what the first block imports). The working directory is a temporary folder
holding `runs/exported/`, an export as `firefly export` writes it. A block preceded by
``<!-- readme-test: skip REASON -->`` is skipped, and must say why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import firefly_descent as ff

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) for each ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        mark = m.group("mark")
        reason = None
        if mark is not None:
            assert mark.startswith("skip "), f"unknown readme-test marker {mark!r}"
            reason = mark[len("skip ") :].strip()
        out.append((text.count("\n", 0, m.start("code")) + 1, m.group("code"), reason))
    return out


class MyModel(nn.Module):
    """A small CNN with BatchNorm: `features.0` (growable conv), `layer1`, a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.features(x)))


def namespace(tmp_path: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(96, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()  # 3 learnable classes
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = MyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return {
        "torch": torch,
        "ff": ff,
        "MyModel": MyModel,
        "model": model,
        "example_inputs": (x[:8],),
        "opt": opt,
        "optimizer": opt,
        "train_loader": loader,
    }


BLOCKS = python_blocks()


def test_readme_has_the_own_loop_recipe_and_no_unexplained_skips():
    assert any("grower.grow(" in code and reason is None for _, code, reason in BLOCKS)
    assert all(reason for _, _, reason in BLOCKS if reason is not None)


@pytest.mark.parametrize(("line", "code", "reason"), BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    from firefly_descent.models import build_model

    spec = {"name": "mlp", "kwargs": {"in_features": 4, "hidden": [5], "num_classes": 2}}
    ff.export_model(build_model(spec["name"], **spec["kwargs"]), "runs/exported", spec)
    ns = namespace(tmp_path)
    params_before = sum(p.numel() for p in ns["model"].parameters())
    exec(compile(code, f"README.md:{line}", "exec"), ns)
    if "grower.grow(" in code:  # the own-loop recipe: the model grew and still trains with its optimizer
        model, optimizer = ns["model"], ns["optimizer"]
        assert sum(p.numel() for p in model.parameters()) > params_before
        x, y = next(iter(ns["train_loader"]))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
