"""The built-in layer rules, registered exactly as a user's rule would be (`register_rule`).

One class per layer type, each with its analysis half (`propagate`) and its engine half (`rederive`,
`check`); constraints a rule records are validated by the check it registers beside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import activations as _activations  # noqa: F401 - registers the built-in activations
from . import shapeops
from .graph import Constraint, Member
from .rules import (
    LayerRule,
    PassThroughRule,
    register_constraint,
    register_rule,
    unfold_patches,
    whole_blocks,
    with_bias_column,
)

# Channel-preserving modules that are not activations (those are in `activations`): units flow through.
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)

if TYPE_CHECKING:
    from .propagate import Propagation


def input_layout(a: Propagation, node: fx.Node) -> tuple[Any, tuple[int, ...]]:
    x = next(arg for arg in node.args if isinstance(arg, fx.Node))
    return a.layout_or_fixed(x)


def _producer(a: Propagation, m: nn.Module, name: str, width: int, node: fx.Node, dim: int) -> int:
    g = a.new_group(width, name)
    a.members[g].append(Member(f"{name}.weight", 0, "producer", "weight", name))
    if getattr(m, "bias", None) is not None:
        a.members[g].append(Member(f"{name}.bias", 0, "producer", "bias", name))
    a.channel_dims[g].append((node.name, dim))
    return g


class LinearRule(LayerRule):
    attrs = ("in_features", "out_features")
    linear_map = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Linear, name: str) -> Any:
        lay, s = input_layout(a, node)
        a.add_members(lay[-1], f"{name}.weight", 1, "consumer", "weight", name)
        for g in a.groups_in(list(lay[:-1])):  # units carried along another dim (MLP-Mixer's token mixing)
            a.constraints[g].append(Constraint("across", name))
        g = _producer(a, m, name, m.out_features, node, len(s) - 1)
        return list(lay[:-1]) + [((g, 1),)]

    def rederive(self, m: nn.Linear, before: dict[str, Any]) -> None:
        m.out_features, m.in_features = m.weight.shape[0], m.weight.shape[1]

    def check(self, m: nn.Linear) -> bool:
        return tuple(m.weight.shape) == (m.out_features, m.in_features)

    def unfold_reason(self, m: nn.Linear) -> str | None:
        return None

    def unfold_input(self, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return with_bias_column(x.reshape(-1, x.shape[-1]), m)

    def output_rows(self, m: nn.Linear, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, y.shape[-1])

    def run_with(self, m: nn.Linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class EmbeddingRule(LayerRule):
    """nn.Embedding: a lookup table whose columns are the units of a new group (the indices carry none)."""

    attrs = ("embedding_dim",)

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Embedding, name: str) -> Any:
        out_s = a.shape(node)
        g = a.new_group(m.embedding_dim, name)
        a.members[g].append(Member(f"{name}.weight", 1, "producer", "weight", name))
        a.channel_dims[g].append((node.name, len(out_s) - 1))
        return [None] * (len(out_s) - 1) + [((g, 1),)]

    def rederive(self, m: nn.Embedding, before: dict[str, Any]) -> None:
        m.embedding_dim = m.weight.shape[1]

    def check(self, m: nn.Embedding) -> bool:
        return m.weight.shape[1] == m.embedding_dim


class ConvRule(LayerRule):
    """Conv1d/2d/3d. groups=1: consumer + producer. Grouped with in == out channels (depthwise is one
    channel per group): the units pass through, and the group grows by whole conv groups."""

    attrs = ("in_channels", "out_channels", "groups")
    linear_map = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.modules.conv._ConvNd, name: str) -> Any:
        lay, s = input_layout(a, node)
        out_s = a.shape(node)
        if any(d is not None for d in lay[2:]):
            a.block_layout(lay[2:], "UnsupportedOpError", f"conv {name!r} slides over a grown dim")
        cin, cout, groups = m.in_channels, m.out_channels, m.groups
        rest = [None] * (len(out_s) - 2)
        if groups == 1:
            a.add_members(lay[1], f"{name}.weight", 1, "consumer", "weight", name)
            g = _producer(a, m, name, cout, node, 1)
            return [lay[0], ((g, 1),)] + rest
        if cin == cout:
            if lay[1] is not None:
                a.add_members(lay[1], f"{name}.weight", 0, "passthrough", "weight", name)
                if m.bias is not None:
                    a.add_members(lay[1], f"{name}.bias", 0, "passthrough", "bias", name)
                if cin // groups > 1:
                    if len(lay[1]) != 1:
                        a.block_layout([lay[1]], "UnsupportedOpError", f"grouped conv {name!r} reads a concatenation")
                    for g in a.groups_in([lay[1]]):
                        a.constraints[g].append(Constraint("conv_groups", name, cin // groups))
            return [lay[0], lay[1]] + rest
        reason = f"grouped conv {name!r} (groups={groups}) changes the channel count ({cin} -> {cout})"
        a.block_layout([lay[1]], "UnsupportedOpError", reason)
        g = a.new_group(cout, name)
        a.block(g, "UnsupportedOpError", reason)
        return [lay[0], ((g, 1),)] + rest

    def rederive(self, m: nn.modules.conv._ConvNd, before: dict[str, Any]) -> None:
        m.out_channels = m.weight.shape[0]
        if before["groups"] > 1 and before["in_channels"] == before["out_channels"]:
            per_group = before["in_channels"] // before["groups"]
            m.in_channels = m.out_channels
            m.groups = m.out_channels // per_group
        else:
            m.in_channels = m.weight.shape[1] * m.groups

    def check(self, m: nn.modules.conv._ConvNd) -> bool:
        return m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels

    def unfold_reason(self, m: nn.modules.conv._ConvNd) -> str | None:
        if m.groups != 1 and not (m.groups == m.in_channels == m.out_channels):
            return "is a grouped convolution"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "uses non-zero or string padding"
        return None

    def per_channel(self, m: nn.modules.conv._ConvNd) -> bool:
        return m.groups != 1 and m.groups == m.in_channels  # (unfolds only with in == out: `unfold_reason`)

    def unfold_input(self, m: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
        X = unfold_patches(x, m.kernel_size, m.stride, m.padding, m.dilation)  # [rows, C_in * k]
        if self.per_channel(m):  # depthwise: unit c reads its own channel's patch
            X = X.reshape(X.shape[0], m.out_channels, -1)
        return with_bias_column(X, m)

    def output_rows(self, m: nn.modules.conv._ConvNd, y: torch.Tensor) -> torch.Tensor:
        return y.movedim(1, -1).reshape(-1, y.shape[1])

    def run_with(
        self, m: nn.modules.conv._ConvNd, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(m.kernel_size) - 1]
        groups = weight.shape[0] if self.per_channel(m) else 1  # depthwise keeps one filter per channel
        return conv(x, weight, bias, m.stride, m.padding, m.dilation, groups)

    def conv_geometry(self, m: nn.modules.conv._ConvNd) -> dict[str, tuple[int, ...]] | None:
        return {"kernel": tuple(m.kernel_size), "stride": tuple(m.stride), "padding": tuple(m.padding),
                "dilation": tuple(m.dilation)}


def norm_members(a: Propagation, dl: Any, m: nn.Module, name: str, stats: bool) -> None:
    if getattr(m, "weight", None) is not None:
        a.add_members(dl, f"{name}.weight", 0, "norm", "norm_weight", name)
    if getattr(m, "bias", None) is not None:
        a.add_members(dl, f"{name}.bias", 0, "norm", "norm_bias", name)
    if stats:
        a.add_members(dl, f"{name}.running_mean", 0, "norm", "running_mean", name)
        a.add_members(dl, f"{name}.running_var", 0, "norm", "running_var", name)


class BatchNormRule(LayerRule):
    running_stats = True
    attrs = ("num_features",)

    def propagate(self, a: Propagation, node: fx.Node, m: nn.modules.batchnorm._NormBase, name: str) -> Any:
        lay, _ = input_layout(a, node)
        if lay[1] is not None:
            norm_members(a, lay[1], m, name, m.track_running_stats and m.running_mean is not None)
        return list(lay)

    def rederive(self, m: nn.modules.batchnorm._NormBase, before: dict[str, Any]) -> None:
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]

    def check(self, m: nn.modules.batchnorm._NormBase) -> bool:
        return m.running_mean is None or m.running_mean.shape[0] == m.num_features


class GroupNormRule(LayerRule):
    attrs = ("num_channels", "num_groups")

    def propagate(self, a: Propagation, node: fx.Node, m: nn.GroupNorm, name: str) -> Any:
        lay, _ = input_layout(a, node)
        dl = lay[1]
        if dl is not None:
            norm_members(a, dl, m, name, False)
            if len(dl) != 1:
                a.block_layout([dl], "UnsupportedOpError", f"GroupNorm {name!r} normalises a concatenation of groups")
            for g in a.groups_in([dl]):
                a.constraints[g].append(Constraint("groupnorm", name, m.num_channels // m.num_groups))
        return list(lay)

    def rederive(self, m: nn.GroupNorm, before: dict[str, Any]) -> None:
        per_group = before["num_channels"] // before["num_groups"]
        if m.weight is not None:
            m.num_channels = m.weight.shape[0]
            m.num_groups = m.num_channels // per_group

    def check(self, m: nn.GroupNorm) -> bool:
        return m.weight is None or (m.weight.shape[0] == m.num_channels and m.num_channels % m.num_groups == 0)



class PoolRule(LayerRule):
    """Pooling, upsampling and padding act per channel over the spatial dims."""

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        return shapeops.channel_pass(a, node, next(arg for arg in node.args if isinstance(arg, fx.Node)))


class FlattenRule(LayerRule):
    def propagate(self, a: Propagation, node: fx.Node, m: nn.Flatten, name: str) -> Any:
        return shapeops.flatten_dims(a, node, node.args[0], m.start_dim, m.end_dim)


class UnflattenRule(LayerRule):
    def propagate(self, a: Propagation, node: fx.Node, m: nn.Unflatten, name: str) -> Any:
        return shapeops.reshape(a, node)


class GLURule(LayerRule):
    """nn.GLU: its input's two halves become one group of row pairs (`shapeops.glu`)."""

    def propagate(self, a: Propagation, node: fx.Node, m: nn.GLU, name: str) -> Any:
        return shapeops.glu(a, node, m.dim)


class SoftmaxRule(LayerRule):
    def propagate(self, a: Propagation, node: fx.Node, m: nn.Softmax, name: str) -> Any:
        return shapeops.softmax_dim(a, node, node.args[0], m.dim)


for _t in PASS_THROUGH_MODULES:
    register_rule(_t, PassThroughRule())
for _t in (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.ZeroPad2d,
):
    register_rule(_t, PoolRule())
register_rule(nn.Linear, LinearRule())
register_rule(nn.Embedding, EmbeddingRule())
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_t, ConvRule())
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_rule(_t, BatchNormRule())
register_rule(nn.GroupNorm, GroupNormRule())
register_rule(nn.Flatten, FlattenRule())
register_rule(nn.Unflatten, UnflattenRule())
register_rule(nn.Softmax, SoftmaxRule())
register_rule(nn.GLU, GLURule())
register_rule(nn.LogSoftmax, SoftmaxRule())
register_constraint("groupnorm", lambda c, g, s, n, ap: whole_blocks("normalised by GroupNorm", c, g, s, n, ap))
register_constraint("conv_groups", lambda c, g, s, n, ap: whole_blocks("convolved by grouped conv", c, g, s, n, ap))
