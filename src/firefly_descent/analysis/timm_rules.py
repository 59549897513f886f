"""Rules for timm's own layers, registered only once the user's code has imported timm (`register_loaded`, run by
every `analyze`; importing timm here would cost seconds of start-up to users without it).

* `timm.layers.Attention` (ViT, DeiT, …): kept whole, its heads a group of their own (`<attention>.heads`), one
  unit per head owning `head_dim` rows of each of q, k and v in the fused `qkv` Linear (and of `gate`, if gated)
  and as many columns of `proj`. Traced into, `qkv(x).reshape(B, N, 3, num_heads, head_dim)` blocks the heads
  (fused `scaled_dot_product_attention` or the manual softmax path alike). A new head: any q/k/v rows, zero
  `proj` columns, exact. `num_heads` and `attn_dim` follow `qkv`; `scale` and `head_dim` are kept.
  `scale_norm` (a norm over all heads together) is refused: new heads would move its statistics.
  `<attention>.head_dim` grows on request (`analysis.heads`): `head_dim` and `scale` follow it; refused under
  `qk_norm` (a norm over each head's dims).
* Swin's `WindowAttention`: the same, plus the relative position bias table, one column per head (a new head's
  column is any value: its output columns are zero). `num_heads` follows the table; head_dim (read from `qkv`
  with `-1`) grows on request, `scale` following it.
* EVA's `EvaAttention` and BEiT's `Attention` (`TiedHeadsAttentionRule`): the output is reshaped to the input's
  width, so like nn.MultiheadAttention the heads are tied to the stream (BEiT's relative position bias table, one
  column per head, follows them; a bias shared by every block refuses them): whole heads grow the stream's group
  by blocks of head_dim, and `<attention>.head_dim` grows one dim in every head with the stream
  (`torch_attention.defer_stream_head_dim`). Fused `qkv` with separate q/k/v biases (k's a zero buffer) or
  unfused `q_proj`/`k_proj`/`v_proj`. Refused with the reason: `scale_norm` and a `gate` (whole heads), rotary
  embeddings or `qk_norm` (head_dim). EVA's GLU FFN is a `chunk` (`shapeops`).
* `Mlp` (the FFN, Mixer's token and channel MLPs), LayerNorm, `cls_token`/`pos_embed` are traced and need no
  rule: the residual stream reaches the LayerNorm completion (docs/architecture.md). Swin's patch merging
  (`reshape(B, H/2, 2, W/2, 2, C).permute(...).flatten(3)`) puts four copies of the channels side by side, so
  the stream before a merging grows by duplicating every channel (new units: refused with the reason); the last
  stage's stream grows either way. `DropPath` passes units through.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .graph import Constraint, Member
from .heads import Projection, _bias, _HeadsAttentionRule, follow_head_dim, fused_projections, head_dim_members
from .rules import LAYER_RULES, LayerRule, PassThroughRule, register_rule
from .torch_attention import StreamHeadDim, defer_stream_head_dim

if TYPE_CHECKING:
    from .propagate import Propagation


def _qkv_head_members(m: nn.Module, name: str, hd: int) -> tuple[int, list[Member]]:
    """The members of a fused `qkv` Linear laid out [3, heads, head_dim] and of `proj`'s input columns."""
    width = m.qkv.out_features // 3
    qkv, proj = f"{name}.qkv", f"{name}.proj"
    members = [Member(f"{qkv}.weight", 0, "producer", "weight", qkv, k * width, hd) for k in range(3)]
    if _bias(m.qkv):
        members += [Member(f"{qkv}.bias", 0, "producer", "bias", qkv, k * width, hd) for k in range(3)]
    members.append(Member(f"{proj}.weight", 1, "consumer", "weight", proj, 0, hd))
    return width // hd, members


def _proj_output(m: nn.Module, name: str) -> tuple[str, int, list[Member]]:
    proj = f"{name}.proj"
    members = [Member(f"{proj}.weight", 0, "producer", "weight", proj)]
    if _bias(m.proj):
        members.append(Member(f"{proj}.bias", 0, "producer", "bias", proj))
    return proj, m.proj.out_features, members


class TimmAttentionRule(_HeadsAttentionRule):
    """timm's `Attention`: fused `qkv` (rows [3, num_heads, head_dim]), optional `gate`, `proj`."""

    attrs = ("num_heads", "attn_dim")

    def refuse(self, m: nn.Module) -> str | None:
        if not isinstance(getattr(m, "norm", None), nn.Identity):
            return "has scale_norm (one norm over all heads' outputs together: new heads would move its statistics)"
        return None

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        if not (isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity)):
            return "does not grow head_dim: it has qk_norm (a norm over each head's dims: new dims would move it)"
        parts = fused_projections(m, name, "qkv", 0, "proj", 1, m.num_heads, m.attn_dim)
        if getattr(m, "gate", None) is not None:  # the gate multiplies each head's output dims: rows by dim
            bias = f"{name}.gate.bias" if _bias(m.gate) else None
            parts.append(Projection("value", f"{name}.gate.weight", 0, f"{name}.gate", m.num_heads, 0, bias))
        return parts

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return follow_head_dim(self, m, old, new, set_attr, "head_dim", ("scale",))

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        readers = [(f"{name}.qkv.weight", 1, f"{name}.qkv")]
        if getattr(m, "gate", None) is not None:
            readers.append((f"{name}.gate.weight", 1, f"{name}.gate"))
        return readers

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        count, members = _qkv_head_members(m, name, m.head_dim)
        if getattr(m, "gate", None) is not None:  # the gate multiplies each head's output: rows by head
            gate = f"{name}.gate"
            members.append(Member(f"{gate}.weight", 0, "producer", "weight", gate, 0, m.head_dim))
            if _bias(m.gate):
                members.append(Member(f"{gate}.bias", 0, "producer", "bias", gate, 0, m.head_dim))
        return count, members

    def output_members(self, m: nn.Module, name: str) -> tuple[str, int, list[Member]]:
        return _proj_output(m, name)

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.attn_dim = m.qkv.out_features // 3
        m.num_heads = m.attn_dim // m.head_dim

    def check(self, m: nn.Module) -> bool:
        return m.qkv.out_features == 3 * m.attn_dim == 3 * m.num_heads * m.head_dim and m.proj.in_features == m.attn_dim


class WindowAttentionRule(_HeadsAttentionRule):
    """timm's Swin `WindowAttention`: like `Attention` (its forward views heads with `-1`, so only `num_heads` is
    read), with a relative position bias table of one column per head."""

    attrs = ("num_heads",)

    def head_size(self, m: nn.Module) -> int:
        return m.proj.in_features // m.num_heads

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        return fused_projections(m, name, "qkv", 0, "proj", 1, m.num_heads, m.proj.in_features)

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return follow_head_dim(self, m, old, new, set_attr, None, ("scale",))

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        return [(f"{name}.qkv.weight", 1, f"{name}.qkv")]

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        count, members = _qkv_head_members(m, name, self.head_size(m))
        table = f"{name}.relative_position_bias_table"
        members.append(Member(table, 1, "elementwise", "additive", name))
        return count, members

    def output_members(self, m: nn.Module, name: str) -> tuple[str, int, list[Member]]:
        return _proj_output(m, name)

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.num_heads = m.relative_position_bias_table.shape[1]

    def check(self, m: nn.Module) -> bool:
        heads = m.relative_position_bias_table.shape[1]
        return (
            heads == m.num_heads
            and m.qkv.out_features == 3 * m.proj.in_features
            and m.proj.in_features % heads == 0
        )


class TiedHeadsAttentionRule(LayerRule):
    """timm's `EvaAttention` and BEiT's `Attention` (module docstring): heads x head_dim is the width of the stream
    they read, so their q/k/v rows, their biases, a relative position bias table (one column per head) and `proj`'s
    columns are members of the stream's group (whole heads, a `blocks` constraint), and the head_dim group is derived
    from that stream once propagation is over. BEiT keeps no `head_dim`: it is read from `scale` (head_dim**-0.5)."""

    attrs = ("num_heads", "head_dim", "scale")
    attention = True

    @staticmethod
    def _head_size(m: nn.Module) -> int:
        return m.head_dim if hasattr(m, "head_dim") else round(m.scale**-2)

    @staticmethod
    def _rows(m: nn.Module, name: str) -> list[tuple[str, str, int, str]]:
        """(part, tensor, offset, module) of every q/k/v weight and bias along its rows."""
        if m.qkv is not None:
            width = m.qkv.out_features // 3
            rows = [(part, f"{name}.qkv.weight", k * width, f"{name}.qkv")
                    for k, part in enumerate(("query", "key", "value"))]
            if m.q_bias is not None:
                rows += [(part, f"{name}.{b}", 0, name) for part, b in (("query_bias", "q_bias"),
                                                                        ("key_bias", "k_bias"), ("bias", "v_bias"))]
            return rows
        rows = []
        for part, short in (("query", "q"), ("key", "k"), ("value", "v")):
            lin = getattr(m, f"{short}_proj")
            rows.append((part, f"{name}.{short}_proj.weight", 0, f"{name}.{short}_proj"))
            if _bias(lin):
                rows.append(({"query": "query_bias", "key": "key_bias"}.get(part, "bias"),
                             f"{name}.{short}_proj.bias", 0, f"{name}.{short}_proj"))
        return rows

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        x = node.args[0] if node.args else node.kwargs.get("x")
        lay, s = a.layout_or_fixed(x)
        out = a.fixed(len(a.shape(node)))
        what = f"{type(m).__name__} {name!r}"
        a.block_layout(lay[:-1], "UnsupportedOpError", f"{what} mixes tokens of a grown dim")
        for other in a.tensor_args(node):
            if other is not x:
                a.block_layout(a.layout(other), "UnsupportedOpError", f"{what} reads a grown mask or position input")
        hd, table = self._head_size(m), getattr(m, "relative_position_bias_table", None)
        head_dim = a.new_group(hd, f"{name}.head_dim")
        dl = lay[-1]
        rope = node.args[1] if len(node.args) > 1 else node.kwargs.get("rope", node.kwargs.get("shared_rel_pos_bias"))
        shared = isinstance(rope, fx.Node) and "shared_rel_pos_bias" in inspect.signature(type(m).forward).parameters
        why = None
        if dl is None or len(dl) != 1 or dl[0][0] is None:
            why = "reads a fixed-width or concatenated input"
        elif not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity) or getattr(m, "gate", None) is not None:
            why = "has scale_norm or a gate (over all heads' outputs together: new heads would change them)"
        elif shared:
            why = "reads a relative position bias shared by every block (one column per head of all blocks at once)"
        if why is not None:
            a.block_layout([dl], "FrozenGroupError", f"{what} {why}")
            a.block(head_dim, "FrozenGroupError", f"{what} grows head_dim only with its stream, and {why}")
            return out
        g = a.find(dl[0][0])
        qkv = [(f"{name}.qkv.weight", f"{name}.qkv")] if m.qkv is not None else [
            (f"{name}.{p}_proj.weight", f"{name}.{p}_proj") for p in "qkv"]
        for tensor, module in qkv:  # they read the stream
            a.members[g].append(Member(tensor, 1, "consumer", "weight", module))
        rows = self._rows(m, name)
        for part, tensor, offset, module in rows:  # and write heads x head_dim: the stream's width
            a.members[g].append(Member(tensor, 0, "producer", "bias" if "bias" in part else "weight", module, offset))
        proj = f"{name}.proj"
        a.members[g].append(Member(f"{proj}.weight", 1, "consumer", "weight", proj))
        if table is not None:  # one column per head: any value for a new head (its output columns are zero)
            a.members[g].append(Member(f"{name}.relative_position_bias_table", 1, "elementwise", "additive", name, 0, 1,
                                       hd))
        a.constraints[g].append(Constraint("blocks", name, hd))
        output, producers = _proj_output(m, name)[0], _proj_output(m, name)[2]  # its own group until the residual
        written = a.new_group(m.proj.out_features, output)
        a.members[written].extend(producers)
        a.channel_dims[written].append((node.name, len(s) - 1))
        out[-1] = ((written, 1),)
        per_head = [getattr(m, n, None) for n in ("q_norm", "k_norm")]
        if (isinstance(rope, fx.Node) and not shared) or any(n is not None and not isinstance(n, nn.Identity)
                                                            for n in per_head):
            a.block(head_dim, "FrozenGroupError", f"{what} does not grow head_dim: rotary embeddings or qk_norm act on "
                    "each head's dims (new dims would change them)")
            return out
        members = head_dim_members([Projection("output", f"{proj}.weight", 1, proj, m.num_heads)], hd)
        for part, tensor, offset, module in rows:
            kind = {"value": "weight"}.get(part, part)
            segment = Projection("value", tensor, 0, module, m.num_heads, offset)  # rows per head
            members += [dataclasses.replace(mb, kind=kind) for mb in head_dim_members([segment], hd)]
        a.members[head_dim].extend(members)
        a.constraints[head_dim].append(Constraint("head_dim", name))
        internal = frozenset({(tensor, 0) for _, tensor, _, _ in rows} | {(f"{proj}.weight", 1),
                                                                         (f"{name}.relative_position_bias_table", 1)})
        defer_stream_head_dim(a, StreamHeadDim(head_dim, g, name, m.num_heads, node, internal))
        return out

    def _width(self, m: nn.Module) -> int:
        return m.qkv.out_features // 3 if getattr(m, "qkv", None) is not None else m.q_proj.out_features

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.num_heads = self._width(m) // self._head_size(m)

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return follow_head_dim(self, m, old, new, set_attr, "head_dim" if hasattr(m, "head_dim") else None,
                               ("scale",))

    def check(self, m: nn.Module) -> bool:
        table = getattr(m, "relative_position_bias_table", None)
        heads_ok = table is None or table.shape[1] == m.num_heads
        return heads_ok and self._width(m) == m.num_heads * self._head_size(m) == m.proj.in_features


# (module, class, rule): looked up in sys.modules, so a timm version that lacks one skips it. DropPath (stochastic
# depth) scales each sample by 0 or 1/keep in training: its units pass through (traced into, its per-sample mask,
# `x.new_empty(shape)`, has no channel rule and would block the stream of any model trained with drop_path_rate).
TIMM_RULES: tuple[tuple[str, str, Any], ...] = (
    ("timm.layers.attention", "Attention", TimmAttentionRule),
    ("timm.models.swin_transformer", "WindowAttention", WindowAttentionRule),
    ("timm.models.eva", "EvaAttention", TiedHeadsAttentionRule),
    ("timm.models.beit", "Attention", TiedHeadsAttentionRule),
    ("timm.layers.drop", "DropPath", PassThroughRule),
)


def register_loaded() -> None:
    """Register the rules whose timm module is loaded now."""
    for module_name, cls_name, rule in TIMM_RULES:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type) and cls not in LAYER_RULES:
            register_rule(cls, rule())
