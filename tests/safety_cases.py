"""Real-data growth-safety cases (Fashion-MNIST slices): models a user would grow, trained briefly, then grown once.

Shared by tests/test_safety.py and benchmarks/safety_probe.py."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import firefly_descent as ff
from firefly_descent.data import load_dataset
from firefly_descent.methods import make_grower
from firefly_descent.models import build_model


class Grey3(nn.Module):
    """Replicate a grey image to 3 channels (at 16x16 to keep torchvision-width models cheap on a CPU)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 16)
        return self.body(x.expand(-1, 3, -1, -1))


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return Grey3(getattr(torchvision.models, name)(weights=None, num_classes=10, **kw))

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "our-resnet18": lambda: build_model("resnet18", in_channels=1, width=8),
    "torchvision-resnet18": _tv("resnet18"),
    "torchvision-mobilenet_v2": _tv("mobilenet_v2", width_mult=0.25),
    "vgg11-bn-linear": lambda: build_model(
        "vgg11", in_channels=1, widths=8, input_size=28, classifier="linear", hidden=(32,)
    ),
    "vgg19-bn": lambda: build_model("vgg19", in_channels=1, widths=8, input_size=28),
    "mlp": lambda: build_model("mlp", in_features=784, hidden=[32, 32]),
}


@dataclass
class Outcome:
    report: Any
    test_before: tuple[float, float]  # (loss, accuracy), eval mode, running statistics refreshed
    test_after: tuple[float, float]
    train_mode_before: float  # held-out test loss in train mode (batch statistics)
    train_mode_after: float
    model: nn.Module
    optimizer: torch.optim.Optimizer


def data(n_train: int = 1024, n_test: int = 512, seed: int = 0) -> tuple[Any, Any]:
    bundle = load_dataset("fashion-mnist", train_subset=n_train, test_subset=n_test, seed=seed)
    return bundle.train, bundle.test


def evaluate(model: nn.Module, batches: list[Any], train_mode: bool = False) -> tuple[float, float]:
    """(loss, accuracy) on `batches`; train mode uses batch statistics and changes no running statistic."""
    from firefly_descent.methods.safety import heldout_loss

    loss = heldout_loss(model, batches, F.cross_entropy, train_mode)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return loss, correct / sum(len(y) for _, y in batches)


@functools.cache
def pretrained(model_name: str, seed: int = 0, epochs: int = 1) -> tuple[nn.Module, Any, list[Any], dict]:
    """`model_name` trained for `epochs` on a Fashion-MNIST slice (cached: callers deep-copy it)."""
    torch.manual_seed(seed)
    train, test = data(seed=seed)
    model = MODELS[model_name]()
    loader = torch.utils.data.DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    test_batches = list(torch.utils.data.DataLoader(test, batch_size=256))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    ff.refresh_batchnorm(model, list(loader)[:8])  # what a grower does first: a fair "before"
    return model, loader, test_batches, opt.state_dict()


def run_case(model_name: str, method: str = "firefly", seed: int = 0, **grower_kw: Any) -> Outcome:
    """Grow a copy of the pretrained `model_name` once with `method` and measure on the test slice."""
    base, loader, test_batches, opt_state = pretrained(model_name, seed)
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(opt_state)
    before = evaluate(model, test_batches)
    tm_before = evaluate(model, test_batches, train_mode=True)[0]
    grower = make_grower(method, seed=seed, **grower_kw)
    growth_data = torch.utils.data.DataLoader(  # the same batches whichever tests ran before
        loader.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed + 1)
    )
    report = grower.grow(model, growth_data, F.cross_entropy, optimizer=opt)
    after = evaluate(model, test_batches)
    tm_after = evaluate(model, test_batches, train_mode=True)[0]
    return Outcome(report, before, after, tm_before, tm_after, model, opt)
