"""A small pre-LN transformer classifier for sequences or images-as-patch-sequences."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.graph import Constraint, Member
from ..analysis.heads import Projection, follow_head_dim, head_dim_members
from ..analysis.rules import LayerRule, register_rule
from ._common import init_weights


class HeadAttention(nn.Module):
    """Self-attention on [B, T, D] whose heads are a width of their own (`num_heads x head_dim`, not tied to
    D as in nn.MultiheadAttention), so heads grow without widening the LayerNorm-normalised residual stream.
    `num_heads` is read from the weights, so it follows growth."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = num_heads * head_dim
        for n in ("q", "k", "v"):
            setattr(self, f"w{n}", nn.Parameter(torch.randn(inner, d_model) / math.sqrt(d_model)))
            setattr(self, f"b{n}", nn.Parameter(torch.zeros(inner)))
        self.wo = nn.Parameter(torch.randn(d_model, inner) / math.sqrt(inner))
        self.bo = nn.Parameter(torch.zeros(d_model))

    @property
    def num_heads(self) -> int:
        return self.wq.shape[0] // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w, bias).view(b, t, -1, self.head_dim).transpose(1, 2)

        att = torch.softmax(
            heads(self.wq, self.bq) @ heads(self.wk, self.bk).transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1
        )
        return F.linear((att @ heads(self.wv, self.bv)).transpose(1, 2).reshape(b, t, -1), self.wo, self.bo)


class HeadAttentionRule(LayerRule):
    """The input's units are read by wq/wk/wv; the heads are their own group, grown by whole heads (q/k/v
    rows and biases produce it, wo's columns read it); wo and bo write a new output group. `<name>.head_dim`
    grows on request (`analysis.heads`): every head's dims, `head_dim` following (the forward scales by it)."""

    def propagate(self, a: Any, node: Any, m: HeadAttention, name: str) -> Any:
        lay, _ = a.layout_or_fixed(node.args[0])
        a.block_layout(lay[:-1], "UnsupportedOpError", f"HeadAttention {name!r} mixes tokens of a grown dim")
        for p in ("wq", "wk", "wv"):
            a.add_members(lay[-1], f"{name}.{p}", 1, "consumer", "weight", name)
        heads = a.new_group(m.wq.shape[0], f"{name}.heads")
        for p in ("q", "k", "v"):
            a.members[heads].append(Member(f"{name}.w{p}", 0, "producer", "weight", name))
            a.members[heads].append(Member(f"{name}.b{p}", 0, "producer", "bias", name))
        a.members[heads].append(Member(f"{name}.wo", 1, "consumer", "weight", name))
        a.constraints[heads].append(Constraint("blocks", name, m.head_dim))
        head_dim = a.new_group(m.head_dim, f"{name}.head_dim")
        projections = [Projection(part, f"{name}.w{p}", 0, name, m.num_heads, 0, f"{name}.b{p}")
                       for part, p in (("query", "q"), ("key", "k"), ("value", "v"))]
        a.members[head_dim].extend(head_dim_members([*projections, Projection("output", f"{name}.wo", 1, name,
                                                                              m.num_heads)], m.head_dim))
        a.constraints[head_dim].append(Constraint("head_dim", name))
        out = a.new_group(m.wo.shape[0], name)
        a.members[out].append(Member(f"{name}.wo", 0, "producer", "weight", name))
        a.members[out].append(Member(f"{name}.bo", 0, "producer", "bias", name))
        return list(lay[:-1]) + [((out, 1),)]

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Any) -> float:
        return follow_head_dim(self, m, old, new, set_attr)

    def check(self, m: HeadAttention) -> bool:
        return m.wq.shape[0] % m.head_dim == 0 and m.wo.shape[1] == m.wq.shape[0] == m.wk.shape[0] == m.wv.shape[0]


register_rule(HeadAttention, HeadAttentionRule())


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)) on [B, T, D].

    `attn` is `nn.MultiheadAttention(batch_first=True)` (heads tied to d_model), or with `head_dim` given a
    `HeadAttention` whose heads grow on their own; `mlp` is a Sequential with
    children `fc1` → `act` (GELU) → `fc2`, the part whose hidden width grows.
    """

    def __init__(
        self, d_model: int, num_heads: int, mlp_hidden: int, dropout: float = 0.0, head_dim: int | None = None
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn: nn.Module
        if head_dim is None:
            self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        else:
            self.attn = HeadAttention(d_model, num_heads, head_dim)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(d_model, mlp_hidden),
                act=nn.GELU(),
                fc2=nn.Linear(mlp_hidden, d_model),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        if isinstance(self.attn, HeadAttention):
            x = x + self.attn(h)
        else:
            x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Embed → (+ learned positions) → `depth` blocks → mean over tokens → LayerNorm → Linear.

    Two input modes, chosen at construction:

    * images ``[B, C, H, W]`` (``in_features is None``): a ``Conv2d(C, d_model, patch_size,
      stride=patch_size)`` patch embedding, flattened to ``[B, T, d_model]``;
    * sequences ``[B, T, in_features]`` (``in_features`` given): a ``Linear`` embedding.

    ``head_dim`` given: every block's attention is a `HeadAttention` with heads of that size, independent of
    ``d_model`` (heads then grow alone, exactly); None: ``nn.MultiheadAttention``.
    ``pos_embed=True`` adds a learned ``pos_embedding`` parameter of shape ``[1, T, d_model]``
    (needs ``input_size`` for images or ``seq_len`` for sequences).
    Attributes: `embed`, `pos_embedding` (or None), `blocks` (Sequential), `norm`, `head`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        d_model: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_hidden: int | None = None,
        mlp_ratio: float = 2.0,
        patch_size: int = 4,
        input_size: int = 32,
        in_features: int | None = None,
        seq_len: int | None = None,
        pos_embed: bool = True,
        dropout: float = 0.0,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None and d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.sequence_input = in_features is not None
        if self.sequence_input:
            self.embed: nn.Module = nn.Linear(in_features, d_model)
            num_tokens = seq_len
        else:
            if input_size % patch_size != 0:
                raise ValueError(f"input_size={input_size} must be divisible by patch_size={patch_size}")
            self.embed = nn.Conv2d(in_channels, d_model, patch_size, stride=patch_size)
            num_tokens = (input_size // patch_size) ** 2
        self.pos_embedding: nn.Parameter | None = None
        if pos_embed:
            if num_tokens is None:
                raise ValueError("pos_embed=True with sequence input needs seq_len")
            self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, d_model))
            nn.init.normal_(self.pos_embedding, std=0.02)
        hidden = mlp_hidden if mlp_hidden is not None else max(1, int(round(d_model * mlp_ratio)))
        self.blocks = nn.Sequential(
            *[TransformerBlock(d_model, num_heads, hidden, dropout, head_dim) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if not self.sequence_input:
            x = x.flatten(2).transpose(1, 2)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        x = self.blocks(x)
        return self.head(self.norm(x.mean(dim=1)))
