"""The shared half of the rules that keep an attention module whole and grow it by whole heads (used by
transformers_rules and timm_rules): it lives apart from both so that neither optional package is imported to
load the other's rules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .graph import Member
from .rules import LayerRule

if TYPE_CHECKING:
    from .propagate import Propagation


def _hidden_states(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("hidden_states")


class _HeadsAttentionRule(LayerRule):
    """Shared half of the attention rules: the stream is read by the q/k/v projections (their input dim), the
    heads are a new group (`heads_members`), and the output projection writes a new group (or the output is the
    heads, read by the next layer); `head_dim` is a blocked group that says why it does not grow; other tensor
    inputs (mask, rotary cos/sin) and the token dims must not carry units."""

    attention = True  # a block holding it (GPT-2's, Llama's, BERT's, timm's) is copied whole as a depth candidate

    def refuse(self, m: nn.Module) -> str | None:
        """Why this module's heads cannot grow (None: they can)."""
        return None

    def head_size(self, m: nn.Module) -> int:
        """The width of one head (`head_dim`)."""
        return m.head_dim

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        """(tensor, dim, module) that read the input stream's units."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        """The head count (units) and the members whose dims follow it."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def output_members(self, m: nn.Module, name: str) -> tuple[str, int, list[Member]] | None:
        """The output group's name, width and producers (None: the output is the heads, side by side)."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def head_dim_reason(self, m: nn.Module) -> str:
        """Why the width of each head (`head_dim`) does not grow: it is recorded as a blocked group
        `<name>.head_dim`, so `analyze` and `widen` say so instead of finding no such group."""
        raise NotImplementedError(f"{type(self).__name__} must define this (a heads rule per attention family)")

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        x = _hidden_states(node)
        out_shapes = a.output_shapes(node)
        multi = a.has_multiple_outputs(node)
        outs: list[Any] = [a.fixed(len(s)) if s is not None else None for s in out_shapes]
        lay, _ = a.layout_or_fixed(x)
        what = f"{type(m).__name__} {name!r}"
        a.block_layout(lay[:-1], "UnsupportedOpError", f"{what} mixes tokens of a grown dim")
        for other in a.tensor_args(node):
            if other is not x:
                a.block_layout(a.layout(other), "UnsupportedOpError", f"{what} reads a grown mask or position input")
        why = self.refuse(m)
        if why is not None:
            a.block_layout([lay[-1]], "FrozenGroupError", f"{what} {why}")
            return tuple(outs) if multi else outs[0]
        for tensor, dim, module in self.stream_readers(m, name):
            a.add_members(lay[-1], tensor, dim, "consumer", "weight", module)
        count, members = self.heads_members(m, name)
        heads = a.new_group(count, f"{name}.heads")
        a.members[heads].extend(members)
        head_dim = a.new_group(self.head_size(m), f"{name}.head_dim")
        a.block(head_dim, "FrozenGroupError", f"{what} {self.head_dim_reason(m)}")
        output = self.output_members(m, name)
        if output is None:  # the module outputs its heads side by side: the next layer reads them
            out, inner = heads, self.head_size(m)
        else:
            out_name, width, producers = output
            out, inner = a.new_group(width, out_name), 1
            a.members[out].extend(producers)
        if out_shapes[0] is not None:
            a.channel_dims[out].append((node.name, len(out_shapes[0]) - 1))
            outs[0][-1] = ((out, inner),)
        return tuple(outs) if multi else outs[0]


_FLAT_HEAD_DIM = (
    "does not grow head_dim: c_attn's q/k/v columns are one flat dim indexed by head and by dim within the head, "
    "already grown by whole heads, and the engine grows one group per segment of a dim, so every head cannot also "
    "take new dims in the same change (grow heads instead)"
)


def _bias(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None
