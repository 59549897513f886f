"""Rules for torch's own attention layers: nn.MultiheadAttention and the nn.TransformerEncoderLayer that holds it.

nn.MultiheadAttention ties its input, its heads (num_heads x head_dim) and its output to one width, `embed_dim`, so
both of its expansions are changes of the stream it reads: whole heads (the stream's own group, grown by blocks of
head_dim) and head dims (`<attention>.head_dim`, derived once the stream is known).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .graph import Constraint, Member
from .rules import LayerRule, register_rule

if TYPE_CHECKING:
    from .propagate import Propagation


class MultiheadAttentionRule(LayerRule):
    """nn.MultiheadAttention ties its input, its heads (num_heads x head_dim) and its output to one
    width, `embed_dim`: growing that group adds whole heads (new q/k/v rows, out-projection columns,
    and the same number of new embedding channels). New heads whose out-projection columns are zero,
    or copies of whole heads with halved out-projection columns, leave the output unchanged."""

    attrs = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim")
    attention = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.MultiheadAttention, name: str) -> Any:
        out_shapes = a.output_shapes(node)
        multi = a.has_multiple_outputs(node)
        outs: list[Any] = [a.fixed(len(s)) if s is not None else None for s in out_shapes]
        inputs = [x for x in (node.args[:3] or ()) if isinstance(x, fx.Node)]
        inputs += [node.kwargs[k] for k in ("query", "key", "value") if isinstance(node.kwargs.get(k), fx.Node)]
        a.block(a.new_group(m.head_dim, f"{name}.head_dim"), "FrozenGroupError", f"nn.MultiheadAttention {name!r} "
                "does not grow head_dim: num_heads x head_dim is its embed_dim, so each head's dims grow only with "
                "that width, by whole heads (use an attention with a head size of its own: models.transformer."
                "HeadAttention, timm's, Hugging Face's)")
        layouts = [a.layout_or_fixed(x)[0] for x in inputs]
        grown = [lay[-1] for lay in layouts if lay[-1] is not None]
        for lay in layouts:  # only the embedding dim may carry units
            a.block_layout(
                lay[:-1], "UnsupportedOpError", f"nn.MultiheadAttention {name!r} mixes tokens of a grown dim"
            )
        reason = None
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.in_proj_weight is None:
            reason = "has separate q/k/v projections or bias_k/bias_v (register a rule for it)"
        elif grown and (len(grown) != len(layouts) or any(len(dl) != 1 for dl in grown)):
            reason = "reads a fixed-width or concatenated input"
        if reason is not None or not grown:
            if reason is not None:
                a.block_layout(grown, "FrozenGroupError", f"nn.MultiheadAttention {name!r} {reason}")
            return tuple(outs) if multi else outs[0]
        g = grown[0][0][0]
        for dl in grown[1:]:
            g = a.union(g, dl[0][0], node)
        g = a.find(g)
        dl = ((g, 1),)
        e = m.embed_dim
        a.add_members(dl, f"{name}.in_proj_weight", 1, "consumer", "weight", name)
        for k in range(3):  # q, k, v rows: three blocks of embed_dim
            a.members[g].append(Member(f"{name}.in_proj_weight", 0, "producer", "weight", name, k * e))
            if m.in_proj_bias is not None:
                a.members[g].append(Member(f"{name}.in_proj_bias", 0, "producer", "bias", name, k * e))
        out = f"{name}.out_proj"
        a.members[g].append(Member(f"{out}.weight", 1, "consumer", "weight", out))
        a.members[g].append(Member(f"{out}.weight", 0, "producer", "weight", out))
        if m.out_proj.bias is not None:
            a.members[g].append(Member(f"{out}.bias", 0, "producer", "bias", out))
        a.constraints[g].append(Constraint("blocks", name, m.head_dim))
        outs[0][-1] = dl
        return tuple(outs) if multi else outs[0]

    def rederive(self, m: nn.MultiheadAttention, before: dict[str, Any]) -> None:
        m.embed_dim = m.out_proj.weight.shape[0]
        m.kdim = m.vdim = m.embed_dim
        m.head_dim = before["head_dim"]
        m.num_heads = m.embed_dim // m.head_dim

    def check(self, m: nn.MultiheadAttention) -> bool:
        w = m.in_proj_weight
        return m.num_heads * m.head_dim == m.embed_dim and (
            w is None or tuple(w.shape) == (3 * m.embed_dim, m.embed_dim)
        )


register_rule(nn.MultiheadAttention, MultiheadAttentionRule())


class TransformerEncoderLayerRule(LayerRule):
    """nn.TransformerEncoderLayer is traced into (its attention and Linear layers carry the rules); post-norm
    (`norm_first=False`) it normalises the stream after the residual add."""

    leaf = False

    def post_norm(self, m: nn.TransformerEncoderLayer) -> bool:
        return not m.norm_first


register_rule(nn.TransformerEncoderLayer, TransformerEncoderLayerRule())
