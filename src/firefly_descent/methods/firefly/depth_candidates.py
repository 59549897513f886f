"""Firefly's new-layer candidates: the over-grown copy with every new layer (z + s·h(z)) or copied block inserted,
each gated like a width candidate, and where a block of which kind may go.

Kept apart from `candidates.py` (the width candidates: splits, new units, new heads) so each file holds one
kind of neighbourhood; both share the `GateBank` that step one and step two read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from ...analysis import GrowthGraph
from ...analysis.rules import is_attention, is_post_norm, is_residual, rule_for
from ...engine import apply, layer_spec, plan_deepen, plan_new_blocks
from ...errors import GrowthError
from .candidates import GateBank


class _GatedScale(nn.Module):
    def __init__(self, bank: GateBank, key: str, index: int) -> None:
        super().__init__()
        self.bank, self.key, self.index = bank, key, index

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.bank.mult(self.key)[self.index] * s


@dataclass
class DepthCandidates:
    """The copy with every new-layer candidate inserted; `layers[i]` is the Residual after `after[i]`, or for
    a new block (spec type "copy") the copy of block `after[i]` itself, its residual outputs gated."""

    net: nn.Module
    bank: GateBank
    after: list[str]
    specs: list[dict[str, Any]]
    layers: list[nn.Module]
    sources: list[nn.Module | None] = field(default_factory=list)  # per copied block: its source as it was
    skipped: dict[str, str] = field(default_factory=dict)  # boundary -> why no candidate could go after it

    def trainables(self) -> list[nn.Parameter]:
        out = []
        for layer in self.layers:
            if is_residual(layer):
                out += list(layer.body.parameters())
                out.append(layer.parametrizations.scale.original)
            else:  # a copied block: all its parameters, the gated outputs' values included
                out += list(layer.parameters())
        return out

    def lr_scales(self) -> dict[int, float]:
        """Per trainable of a copied block (by id): the RMS of the source block's parameter it copies, so that
        step one's learning rate means a fraction of the weights' own scale, as the width candidates' relative
        parametrisation does (a transformer's weights are ~0.02: an absolute step of 0.03 would erase them)."""
        out: dict[int, float] = {}
        for layer, source in zip(self.layers, self.sources):
            if source is None:
                continue
            rms = {n: float(q.detach().pow(2).mean().sqrt()) for n, q in source.named_parameters() if q.numel()}
            positive = [v for v in rms.values() if v > 0]
            fallback = sum(positive) / len(positive) if positive else 1.0  # a zero tensor (biases at init)
            for name, p in layer.named_parameters():
                ref = rms.get(name.replace(".parametrizations.", ".").removesuffix(".original"))
                if ref is not None:
                    out[id(p)] = ref if ref > 0 else fallback
        return out

    def block_values(self, i: int) -> dict[str, torch.Tensor]:
        """The state of copied block i at alpha = 1 (gated outputs multiplied out), as a plain block's."""
        layer = self.layers[i]
        out = {k: v.detach().clone() for k, v in layer.state_dict().items() if ".parametrizations." not in f".{k}"}
        for name in self.specs[i]["zero"]:
            mod, _, attr = name.rpartition(".")
            out[name] = getattr(layer.get_submodule(mod) if mod else layer, attr).detach().clone()
        return out

    def added_params(self, i: int) -> int:
        """Parameters candidate i adds: a Residual's body and scale, or a whole copied block."""
        layer = self.layers[i]
        if is_residual(layer):
            return sum(p.numel() for p in layer.body.parameters()) + 1
        return sum(p.numel() for p in layer.parameters())


DEPTH_BLOCKS = ("auto", "layer", "conv_bn_act", "dwsep", "basic_block", "copy")


def is_attention_block(graph: GrowthGraph, model: nn.Module, name: str) -> bool:
    """A transformer block: `name` holds an attention module (nn.MultiheadAttention, or a module whose heads
    are a group grown by whole heads) and, if it is a stock nn.TransformerEncoderLayer, is pre-norm (a
    post-norm copy normalises the stream, so it cannot start as the identity)."""
    module = model.get_submodule(name)
    if is_post_norm(module):
        return False
    if any(is_attention(m) for m in module.modules()):
        return True
    return any(
        c.kind == "blocks" and c.module.startswith(name + ".") for g in graph.groups.values() for c in g.constraints
    )


def depth_block_spec(graph: GrowthGraph, model: nn.Module, after: str, block: str = "auto") -> dict[str, Any]:
    """The residual body inserted after `after`: one layer ("layer": conv-BN-ReLU or Linear-act), a named
    block type, or ("auto") a block of the model's own kind: a stride-1 depthwise-separable block after a
    block holding a depthwise conv (MobileNetV1), a basic block after a block with two or more convs
    (ResNet), otherwise one layer (conv-BN-ReLU for a VGG-style net). Blocks are only used on
    2-D convolutional outputs; elsewhere the one-layer spec is used."""
    if block == "copy" or (block == "auto" and is_attention_block(graph, model, after)):
        # a transformer block's own kind: a copy of it, residual outputs zero (see `plan_new_blocks`)
        return dict(plan_new_blocks(graph, model, [after]).layers[0].spec)
    boundary = graph.boundaries[after]
    spec = layer_spec(boundary)
    if block == "layer" or spec["type"] != "conv_bn_act" or spec.get("dims") != 2:
        return spec
    if block == "auto":
        convs = [m for m in _own_modules(model.get_submodule(after)) if _conv2d(m)]
        if any(rule_for(m).per_channel(m) for m in convs):
            block = "dwsep"
        elif len(convs) >= 2:
            block = "basic_block"
        else:
            block = "conv_bn_act"
    if block not in DEPTH_BLOCKS[2:-1]:
        raise ValueError(f"depth_block must be one of {', '.join(DEPTH_BLOCKS)}, not {block!r}")
    out = {"type": block, "channels": spec["channels"], "kernel_size": spec.get("kernel_size", 3)}
    if block == "basic_block":  # its own hidden group, which keeps its width when the channels grow
        out["hidden"] = spec["channels"]
    return out


def _conv2d(m: nn.Module) -> bool:
    """A 2-d convolution (its rule gives a geometry with two spatial dims)."""
    rule = rule_for(m)
    geo = rule.conv_geometry(m) if rule is not None else None
    return geo is not None and len(geo["kernel"]) == 2


def _own_modules(module: nn.Module) -> list[nn.Module]:
    """`module` and its descendants, leaving out residual layers inserted by earlier growth."""
    out = [module]
    for child in module.children():
        if not is_residual(child):
            out += _own_modules(child)
    return out


def build_depth_candidates(
    model: nn.Module,
    graph: GrowthGraph,
    after: list[str],
    example_inputs: tuple[torch.Tensor, ...],
    init_scale: float,
    block: str = "layer",
) -> DepthCandidates:
    """A copy of `model` with a residual candidate (scale 0: exact) after each of `after`; `block` picks
    each body (see `depth_block_spec`). A new transformer block (a copy, spec type "copy") is trained in its
    own parameters, its residual outputs W = (alpha + g) V with V = `init_scale` times the copied block's
    (a parametrisation, like a Residual's scale): exact at alpha = 0. A candidate that cannot be built or
    inserted (a GrowthError) is left out, its reason in `skipped`: one bad boundary never fails the step."""
    skipped: dict[str, str] = {}
    kept: list[tuple[str, dict[str, Any]]] = []
    for a in after:
        try:
            plan_deepen(graph, [a], "residual", scale=0.0)  # a boundary carrying one group's units
            kept.append((a, depth_block_spec(graph, model, a, block)))
        except GrowthError as e:
            skipped[a] = f"no new block after it: {e}"
    net = _depth_net(model, graph, kept, example_inputs)
    if net is None:  # one insertion breaks the model: find which, on their own (RNG state kept as it was)
        with torch.random.fork_rng(devices=[]):
            for a, spec in list(kept):
                try:
                    _depth_net(model, graph, [(a, spec)], example_inputs, single=True)
                except GrowthError as e:
                    skipped[a] = f"no new block after it: {e}"
                    kept.remove((a, spec))
        net = _depth_net(model, graph, kept, example_inputs, single=True)
    assert net is not None
    after, specs = [a for a, _ in kept], [spec for _, spec in kept]
    for p in net.parameters():
        p.requires_grad_(False)
    bank = GateBank()
    bank.add("layer", len(after), next(net.parameters()))
    layers: list[nn.Module] = []
    sources: list[nn.Module | None] = [None] * len(after)
    for i, name in enumerate(after):
        seq = net.get_submodule(name)
        layer = seq[1]
        if specs[i]["type"] == "copy":
            source = model.get_submodule(name)
            sources[i] = _plain_copy(source)
            for p in layer.parameters():
                p.requires_grad_(True)
            for pname in specs[i]["zero"]:
                mod, _, attr = pname.rpartition(".")
                owner = layer.get_submodule(mod) if mod else layer
                with torch.no_grad():
                    getattr(owner, attr).copy_(init_scale * source.get_parameter(pname))
                parametrize.register_parametrization(owner, attr, _GatedScale(bank, "layer", i))
            layers.append(layer)
            continue
        assert is_residual(layer)
        for p in layer.body.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            layer.scale.fill_(init_scale)
        layer.scale.requires_grad_(True)
        parametrize.register_parametrization(layer, "scale", _GatedScale(bank, "layer", i))
        layers.append(layer)
    return DepthCandidates(net, bank, list(after), specs, layers, sources, skipped)


def _depth_net(
    model: nn.Module,
    graph: GrowthGraph,
    kept: list[tuple[str, dict[str, Any]]],
    example_inputs: tuple[torch.Tensor, ...],
    single: bool = False,
) -> nn.Module | None:
    """A copy of `model` with the blocks `kept` (boundary, spec) inserted at scale 0; None when inserting
    them all fails (unless `single`: then the GrowthError propagates, to name the candidate at fault)."""
    net = copy.deepcopy(model)
    if hasattr(net, "_firefly_history"):
        net._firefly_history = []
    plan = plan_deepen(graph, [a for a, _ in kept], "residual", scale=0.0)
    for layer, (_, spec) in zip(plan.layers, kept):
        layer.spec = spec
        if spec["type"] == "copy":
            layer.kind = "copy"
    try:
        apply(net, plan, example_inputs=example_inputs, record=False)
    except GrowthError:
        if single:
            raise
        return None
    return net


def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` without its growth history (a template to widen a kept block's values on)."""
    out = copy.deepcopy(module)
    if hasattr(out, "_firefly_history"):
        out._firefly_history = []
    return out
