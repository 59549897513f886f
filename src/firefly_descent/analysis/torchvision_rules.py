"""Rules for torchvision's own layers and functions, registered like any user's rule.

* `stochastic_depth` / `StochasticDepth`: drops whole samples, never mixes channels (pass-through).
* `LayerNorm2d` (ConvNeXt): traced into (`permute` + `F.layer_norm` + `permute`), not treated as a
  LayerNorm over the last dim.
* `VisionTransformer`: its `hidden_dim` follows the patch embedding's width; its class token and the
  encoder's position embedding are members of the embedding group (found through `expand` and `+`).
* Swin's `shifted_window_attention`: a one-line refusal (its relative position bias has one entry per
  head, which the unit-level members cannot express); `_patch_merging_pad` keeps the channel dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from . import shapeops
from .builtin_rules import LayerNormRule
from .rules import LayerRule, register_rule
from .shapeops import register_function_rule
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


def _last_dim_pass(a: Propagation, node: fx.Node) -> Any:
    """Ops that pad or index every dim but the last (channels-last): the last dim keeps its units."""
    lay, s = a.layout_or_fixed(node.args[0])
    a.block_layout(lay[:-1], "UnsupportedOpError", f"{source_of(node)} pads a grown dim")
    out_s = a.shape(node)
    return [None] * (len(out_s) - 1) + [lay[-1]]


def _window_attention(a: Propagation, node: fx.Node) -> Any:
    lay, s = a.layout_or_fixed(node.args[0])
    a.block_layout(
        lay,
        "UnsupportedOpError",
        f"shifted_window_attention at {source_of(node)} has a relative position bias with one entry per head "
        "(heads cannot grow unit by unit); exclude the attention or keep this width",
    )
    return a.fixed(len(a.shape(node)))


if torchvision is not None:
    register_function_rule(stochastic_depth, lambda a, node: shapeops.elementwise(a, node, "add"))
    register_rule(StochasticDepth, TracedInto())
    register_rule(convnext.LayerNorm2d, LayerNorm2dRule())
    register_rule(vision_transformer.VisionTransformer, VisionTransformerRule())
    register_rule(swin_transformer.ShiftedWindowAttention, SwinAttentionRule())
    register_function_rule(swin_transformer.shifted_window_attention, _window_attention)
    register_function_rule(swin_transformer._patch_merging_pad, _last_dim_pass)
