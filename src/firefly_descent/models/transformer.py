"""A small pre-LN transformer classifier for sequences or images-as-patch-sequences."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._common import init_weights


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)) on [B, T, D].

    `attn` is `nn.MultiheadAttention(batch_first=True)`; `mlp` is a Sequential with
    children `fc1` → `act` (GELU) → `fc2`, the part whose hidden width grows.
    """

    def __init__(self, d_model: int, num_heads: int, mlp_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
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
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Embed → (+ learned positions) → `depth` blocks → mean over tokens → LayerNorm → Linear.

    Two input modes, chosen at construction:

    * images ``[B, C, H, W]`` (``in_features is None``): a ``Conv2d(C, d_model, patch_size,
      stride=patch_size)`` patch embedding, flattened to ``[B, T, d_model]``;
    * sequences ``[B, T, in_features]`` (``in_features`` given): a ``Linear`` embedding.

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
    ) -> None:
        super().__init__()
        if d_model % num_heads != 0:
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
            *[TransformerBlock(d_model, num_heads, hidden, dropout) for _ in range(depth)]
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
