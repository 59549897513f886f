"""Reference models and the test zoo: they build, run, and trace with torch.fx exactly.

The growth analysis reads models through fx, so a model that does not trace (or
traces to a different function) is useless to the library.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx
from torch import nn
from zoo import BAD_MODELS, GOOD_MODELS, NOT_TRACEABLE, ZOO, randomize_norm_stats

from firefly_descent.models import VGG, available_models, build_model, model_spec

# name -> (kwargs, input shape, expected output shape); tiny widths keep the file fast.
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...], tuple[int, ...]]] = {
    "mlp": (dict(in_features=64, hidden=[16, 12], num_classes=5), (3, 1, 8, 8), (3, 5)),
    "residual-mlp": (dict(in_features=20, width=16, depth=2, num_classes=4), (3, 20), (3, 4)),
    "vgg11": (dict(in_channels=1, widths=4, input_size=28, num_classes=10), (2, 1, 28, 28), (2, 10)),
    "vgg16": (dict(in_channels=1, widths=4, input_size=28, num_classes=10), (2, 1, 28, 28), (2, 10)),
    "vgg19": (dict(in_channels=3, widths=4, input_size=32, num_classes=7), (2, 3, 32, 32), (2, 7)),
    "resnet20": (dict(width=4, num_classes=10), (2, 3, 32, 32), (2, 10)),
    "resnet56": (dict(width=2, num_classes=10), (2, 3, 16, 16), (2, 10)),
    "resnet18": (dict(width=4, num_classes=100), (2, 3, 32, 32), (2, 100)),
    "mobilenetv1": (dict(width=8, num_classes=100), (2, 3, 32, 32), (2, 100)),
    "mobilenetv1-stages": (dict(widths=4, blocks=(1, 2, 1, 1, 1), num_classes=10), (2, 3, 32, 32), (2, 10)),
    "vgg-stages": (dict(in_channels=1, widths=4, input_size=28, num_classes=10), (2, 1, 28, 28), (2, 10)),
    "darts-eval": (dict(genotype="darts_v2", C=2, layers=3, in_channels=1, input_size=8, num_classes=3), (2, 1, 8, 8),
                   (2, 3)),
    "replayed-architecture": (
        dict(base="mlp", base_kwargs=dict(in_features=12, hidden=[6], num_classes=3)),
        (2, 12),
        (2, 3),
    ),
    "transformer": (
        dict(in_channels=3, input_size=32, patch_size=8, d_model=16, num_heads=2, depth=2, num_classes=10),
        (2, 3, 32, 32),
        (2, 10),
    ),
}


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _assert_traces_exactly(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ref = model(*inputs)
        out = traced(*inputs)
    assert torch.equal(ref, out)
    return ref


def test_every_model_has_a_case() -> None:
    from firefly_descent.models import _REGISTRY

    # models registered at run time by other code (e.g. the benchmarks' replayed architectures) are not built-ins
    builtin = [n for n in available_models() if _REGISTRY[n].__module__.startswith("firefly_descent.")]
    assert sorted(CASES) == builtin


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_forward_trace(name: str) -> None:
    kw, in_shape, out_shape = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, **kw)
    out = _assert_traces_exactly(model, (_randn(*in_shape),))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlp", "vgg11", "resnet20"])
def test_deterministic_given_seed(name: str) -> None:
    kw = CASES[name][0]
    torch.manual_seed(3)
    a = build_model(name, **kw).state_dict()
    torch.manual_seed(3)
    b = build_model(name, **kw).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_name_and_option() -> None:
    with pytest.raises(ValueError, match="available"):
        build_model("vgg7")
    with pytest.raises(TypeError, match="unknown options"):
        build_model("vgg11", widht=4)
    assert build_model("VGG11", widths=2).__class__ is VGG
    assert build_model("Residual_MLP", in_features=4, width=4).blocks is not None
    assert model_spec("resnet20")["width"] == 16


def _maxpools(model: nn.Module) -> int:
    return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_vgg_widths_and_pools() -> None:
    assert _maxpools(build_model("vgg11", widths=2, input_size=28)) == 4  # 28→14→7→3→1, 5th skipped
    assert _maxpools(build_model("vgg11", widths=2, input_size=32)) == 5
    convs = [m for m in build_model("vgg19", widths=16).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16] * 16 + [10]  # paper: 16 per layer + 1×1 classifier
    assert convs[-1].kernel_size == (1, 1)
    convs = [m for m in build_model("vgg11", width_multiplier=0.25).features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    per_layer = [3, 4, 5, 6, 7, 8, 9, 10]
    convs = [m for m in build_model("vgg11", widths=per_layer).features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == per_layer
    with pytest.raises(ValueError):
        build_model("vgg11", widths=[4, 4])


@pytest.mark.parametrize(
    "kw, feat",
    [
        (dict(pool_to=2), 4 * 2 * 2),
        (dict(max_pools=3), 4 * 3 * 3),  # 28→14→7→3 then no more pools
        (dict(max_pools=3, hidden=[8]), 4 * 3 * 3),
    ],
)
def test_vgg_linear_classifier_keeps_positions(kw: dict[str, Any], feat: int) -> None:
    model = build_model("vgg11", in_channels=1, widths=4, input_size=28, classifier="linear", **kw)
    first = next(m for m in model.classifier if isinstance(m, nn.Linear))
    assert first.in_features == feat
    out = _assert_traces_exactly(model, (_randn(2, 1, 28, 28),))
    assert out.shape == (2, 10)


def test_resnet_structure() -> None:
    m = build_model("resnet20", width=4)
    assert [len(m.layer1), len(m.layer2), len(m.layer3)] == [3, 3, 3]
    assert m.layer1[0].downsample is None and m.layer2[0].downsample is not None
    assert m.layer2[0].downsample[0].kernel_size == (1, 1) and m.fc.in_features == 16
    assert len(build_model("resnet56", width=2).layer3) == 9
    r18 = build_model("resnet18", width=4)
    assert [len(getattr(r18, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2] and r18.fc.in_features == 32


def test_mobilenet_structure() -> None:
    m = build_model("mobilenetv1", width=32)
    dws = [b.dw_conv for b in m.features]
    assert len(dws) == 13 and all(c.groups == c.in_channels == c.out_channels == 32 for c in dws)
    assert m.classifier.in_features == 32
    std = build_model("mobilenetv1", width_multiplier=0.25)
    assert std.stem.conv.out_channels == 8 and std.classifier.in_features == 256


def test_mlp_variants() -> None:
    x = _randn(4, 10)
    for norm in (None, "batch", "layer"):
        m = build_model("mlp", in_features=10, hidden=8, depth=3, norm=norm, act="gelu", num_classes=2)
        assert sum(isinstance(l, nn.Linear) for l in m.modules()) == 4
        assert _assert_traces_exactly(m, (x,)).shape == (4, 2)
    assert len(build_model("residual-mlp", in_features=10, width=8, depth=0).blocks) == 0
    with pytest.raises(ValueError):
        build_model("mlp", in_features=10, hidden=[8, 8], depth=3)


def test_transformer_sequence_mode() -> None:
    m = build_model("transformer", in_features=5, seq_len=7, d_model=8, num_heads=2, depth=1, num_classes=3)
    assert m.blocks[0].mlp.fc1.out_features == 16
    assert _assert_traces_exactly(m, (_randn(2, 7, 5),)).shape == (2, 3)
    m = build_model("transformer", in_features=5, pos_embed=False, d_model=8, num_heads=2, depth=1)
    assert m.pos_embedding is None
    assert _assert_traces_exactly(m, (_randn(2, 9, 5),)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_runs_and_traces(name: str) -> None:
    model, inputs = ZOO[name]()
    randomize_norm_stats(model)
    if name in NOT_TRACEABLE:
        with torch.no_grad():
            model.eval()(*inputs)
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(model)
        return
    out = _assert_traces_exactly(model, inputs)
    assert out.shape[0] == inputs[0].shape[0] and torch.isfinite(out).all()
    model.train()
    model(*inputs).sum().backward()


def test_zoo_is_deterministic_and_partitioned() -> None:
    assert set(GOOD_MODELS) | BAD_MODELS == set(ZOO) and not set(GOOD_MODELS) & BAD_MODELS
    state = torch.get_rng_state()
    (m1, x1), (m2, x2) = ZOO["resnet_basic"](), ZOO["resnet_basic"]()
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(x1[0], x2[0])
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_replayed_architecture_rebuilds_a_grown_shape_freshly(tmp_path) -> None:
    import firefly_descent as ff

    base_kwargs = dict(in_features=12, hidden=[6], num_classes=3)
    grown = build_model("mlp", **base_kwargs)
    x = torch.randn(2, 12)
    ff.widen(grown, x, {ff.analyze(grown, x).growable()[0].name: 4})
    scratch = build_model(
        "replayed-architecture", base="mlp", base_kwargs=base_kwargs, history=ff.growth_history(grown)
    )
    assert [p.shape for p in scratch.parameters()] == [p.shape for p in grown.parameters()]
    assert ff.growth_history(scratch) == []
    assert not any(torch.equal(a, b) for a, b in zip(scratch.parameters(), grown.parameters()) if a.dim() > 1)
