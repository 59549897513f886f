"""Rules for torchvision's own layers and functions, registered like any user's rule.

* `stochastic_depth` / `StochasticDepth`: drops whole samples, never mixes channels (pass-through).
* `LayerNorm2d` (ConvNeXt): traced into (`permute` + `F.layer_norm` + `permute`), not treated as a
  LayerNorm over the last dim.
* `VisionTransformer`: its `hidden_dim` follows the patch embedding's width; its class token and the
  encoder's position embedding are members of the embedding group (found through `expand` and `+`).
* Swin's `shifted_window_attention`: grows by whole heads like nn.MultiheadAttention, its relative position
  bias table one column per head, and by head dims with its stream as nn.MultiheadAttention does
  (`torch_attention.defer_stream_head_dim`); `_patch_merging_pad` repeats the channel units four times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from . import shapeops
from .graph import Constraint, Member
from .heads import Projection, follow_head_dim, head_dim_members
from .norm_stream import LayerNormRule
from .rules import LayerRule, register_rule
from .shapeops import register_function_rule
from .torch_attention import StreamHeadDim, defer_stream_head_dim
from .trace import source_of

if TYPE_CHECKING:
    from .propagate import Propagation

try:  # torchvision is a dependency, but the analysis itself does not need it
    import torchvision
    from torchvision.models import convnext, swin_transformer, vision_transformer
    from torchvision.ops import StochasticDepth, stochastic_depth
except ImportError:  # pragma: no cover
    torchvision = None


class TracedInto(LayerRule):
    """A module whose forward is captured op by op (its own ops carry the rules)."""

    leaf = False


class LayerNorm2dRule(LayerNormRule):
    """ConvNeXt's channels-first LayerNorm: traced into (its `F.layer_norm` call carries the rule), with the
    attributes of a LayerNorm to re-derive."""

    leaf = False


class VisionTransformerRule(TracedInto):
    attrs = ("hidden_dim",)

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.hidden_dim = m.conv_proj.out_channels

    def check(self, m: nn.Module) -> bool:
        return m.hidden_dim == m.conv_proj.out_channels


class SwinAttentionRule(TracedInto):
    attrs = ("num_heads",)

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.num_heads = m.relative_position_bias_table.shape[1]

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Any) -> float:
        return follow_head_dim(self, m, old, new, set_attr, head_dim_attr=None)  # its scale is C // num_heads

    def check(self, m: nn.Module) -> bool:
        return m.relative_position_bias_table.shape[1] == m.num_heads and m.qkv.out_features == 3 * m.proj.in_features


def _patch_merging(a: Propagation, node: fx.Node) -> Any:
    """Swin's `_patch_merging_pad`: pads H and W, then concatenates the four 2x2 neighbours on the
    (channels-last) last dim: the output's last dim is the input's units four times."""
    lay, s = a.layout_or_fixed(node.args[0])
    a.block_layout(lay[:-1], "UnsupportedOpError", f"{source_of(node)} merges patches over a grown dim")
    out_s = a.shape(node)
    reps = out_s[-1] // s[-1]
    return [None] * (len(out_s) - 1) + [tuple(lay[-1]) * reps if lay[-1] is not None else None]


def _window_attention(a: Propagation, node: fx.Node) -> Any:
    """Swin's `shifted_window_attention(x, qkv_weight, proj_weight, bias, window, num_heads, ...)` on
    channels-last input: like nn.MultiheadAttention, its input, heads and output share one width and grow
    by whole heads; the relative position bias table has one column per head (a `per = head_dim` member)."""

    def arg(i: int, name: str) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)

    lay, _ = a.layout_or_fixed(node.args[0])
    out = a.fixed(len(a.shape(node)))
    dl = lay[-1]
    a.block_layout(lay[:-1], "UnsupportedOpError", f"shifted_window_attention at {source_of(node)} mixes a grown dim")
    if dl is None:
        return out
    qkv, proj, num_heads = arg(1, "qkv_weight"), arg(2, "proj_weight"), arg(5, "num_heads")
    qkv_bias, proj_bias = arg(9, "qkv_bias"), arg(10, "proj_bias")
    params = [p for p in (qkv, proj, qkv_bias, proj_bias) if p is not None]
    reason = None
    if len(dl) != 1 or not isinstance(num_heads, int) or arg(11, "logit_scale") is not None:
        reason = "reads a concatenation, or has a logit scale (Swin V2)"
    elif not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        reason = "takes computed weights"
    if reason is not None:
        a.block_layout([dl], "UnsupportedOpError", f"shifted_window_attention at {source_of(node)} {reason}")
        return out
    attn = str(qkv.target).rpartition(".")[0].rpartition(".")[0]
    table = f"{attn}.relative_position_bias_table"
    c = a.shape(node.args[0])[-1]
    head_dim = c // num_heads
    grown_dims = a.new_group(head_dim, f"{attn}.head_dim")
    qkv_b = str(qkv_bias.target) if qkv_bias is not None else None
    a.members[grown_dims].extend(head_dim_members(
        [Projection(part, str(qkv.target), 0, f"{attn}.qkv", num_heads, k * c, qkv_b)
         for k, part in enumerate(("query", "key", "value"))]
        + [Projection("output", str(proj.target), 1, f"{attn}.proj", num_heads)], head_dim))
    a.constraints[grown_dims].append(Constraint("head_dim", attn))
    internal = frozenset({(str(qkv.target), 0), (qkv_b, 0), (str(proj.target), 1), (table, 1)})
    defer_stream_head_dim(a, StreamHeadDim(grown_dims, dl[0][0], attn, num_heads, node, internal))
    g = a.find(dl[0][0])
    a.add_members(dl, str(qkv.target), 1, "consumer", "weight", attn)
    for k in range(3):
        a.members[g].append(Member(str(qkv.target), 0, "producer", "weight", attn, k * c))
        if qkv_bias is not None:
            a.members[g].append(Member(str(qkv_bias.target), 0, "producer", "bias", attn, k * c))
    a.members[g].append(Member(str(proj.target), 1, "consumer", "weight", attn))
    a.members[g].append(Member(str(proj.target), 0, "producer", "weight", attn))
    if proj_bias is not None:
        a.members[g].append(Member(str(proj_bias.target), 0, "producer", "bias", attn))
    a.members[g].append(Member(table, 1, "elementwise", "additive", attn, 0, 1, head_dim))
    a.constraints[g].append(Constraint("blocks", attn, head_dim))
    out[-1] = dl
    return out


if torchvision is not None:
    register_function_rule(stochastic_depth, lambda a, node: shapeops.elementwise(a, node, "add"))
    register_rule(StochasticDepth, TracedInto())
    register_rule(convnext.LayerNorm2d, LayerNorm2dRule())
    register_rule(vision_transformer.VisionTransformer, VisionTransformerRule())
    register_rule(swin_transformer.ShiftedWindowAttention, SwinAttentionRule())
    register_function_rule(swin_transformer.shifted_window_attention, _window_attention)
    register_function_rule(swin_transformer._patch_merging_pad, _patch_merging)
