"""Rules for Hugging Face transformers' own layers, registered only when transformers is importable.

* `Conv1D` (GPT-1/GPT-2): a Linear whose weight is stored transposed, [in, out], with forward
  `addmm(bias, x.view(-1, in), weight)`. Its weight's dim 0 reads the input's units (consumer), its dim 1
  and its bias start a new group (producer). Without this rule the analysis traces into it and its `addmm`
  blocks the residual stream. The weight-space baselines (`unfold_input`…) read a dense weight as
  [out, in], so this rule says the layer does not unfold for them rather than answer with the wrong layout.
* `LlamaRMSNorm` (`weight * x / sqrt(mean(x^2) + variance_epsilon)`), once `modeling_llama` is loaded:
  kept whole, an RMSNorm over the residual stream (`norm_stream.RMSNormRule`), so the stream widens
  exactly. Traced into, its mean over the units blocks the stream.
* transformers' element-wise activation modules (`NewGELUActivation` in GPT-2's MLP, …): units pass
  through. Traced into, their `torch.pow` and the like have no channel rule and would block the MLP.
* `GPT2Attention`, `LlamaAttention`, `ViTAttention` and `BertSelfAttention`, once their modeling module is
  loaded: kept whole, their heads are a group of their own (`<attention>.heads`), one unit per head (per
  key/value head and its query heads under grouped-query attention), each unit owning `head_dim` rows of q/k/v
  (`Member.inner`) and as many columns of the output projection (BERT's: the next layer's). A new unit is a new
  head: any q/k/v rows, zero output columns, so the other heads and the output are unchanged; a duplicated head
  with halved output columns is exact too. Traced into, GPT-2's `c_attn(...).split(...)` and the `view`s to
  heads block these units. The head count follows the weights (`split_size`, `num_heads`,
  `num_attention_heads` are re-derived; Llama's forward reads only `head_dim` and `num_key_value_groups`, which
  a new whole group keeps), so heads x head_dim may differ from the stream. head_dim grows on request
  (`<attention>.head_dim`, `analysis.heads`: new key rows zero, query rows rescaled, `head_dim` and `scaling`
  following) for GPT-2, ViT and BERT (whose heads `output.dense` beside it reads); Llama's is refused: its rotary
  embedding, shared by every layer, sets its frequencies from head_dim (docs/architecture.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from .graph import Constraint, Member
from .heads import Projection, _bias, _HeadsAttentionRule, follow_head_dim, fused_projections, reads_output
from .norm_stream import RMSNormRule
from .rules import LAYER_RULES, LayerRule, PassThroughRule, register_rule

if TYPE_CHECKING:
    from .propagate import Propagation

try:  # optional: `import firefly_descent` must not need transformers
    from transformers import activations as hf_activations
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers not installed
    Conv1D = hf_activations = None

# Parameter-free, element-wise activation modules of `transformers.activations` (looked up by name: a
# version that lacks one simply skips it).
ELEMENTWISE_ACTIVATIONS = (
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "ClippedGELUActivation",
    "GELUTanh",
    "AccurateGELUActivation",
    "MishActivation",
    "SiLUActivation",
    "LaplaceActivation",
    "ReLUSquaredActivation",
    "LinearActivation",
    "SqrtSoftplusActivation",
)


class Conv1DRule(LayerRule):
    """transformers' Conv1D: `nf` out features, `nx` in features, weight [nx, nf], bias [nf]."""

    attrs = ("nf", "nx")
    linear_map = True

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        x = next(arg for arg in node.args if isinstance(arg, fx.Node))
        lay, s = a.layout_or_fixed(x)
        a.add_members(lay[-1], f"{name}.weight", 0, "consumer", "weight", name)
        g = a.new_group(m.nf, name)
        a.members[g].append(Member(f"{name}.weight", 1, "producer", "weight", name))
        if getattr(m, "bias", None) is not None:
            a.members[g].append(Member(f"{name}.bias", 0, "producer", "bias", name))
        a.channel_dims[g].append((node.name, len(s) - 1))
        return list(lay[:-1]) + [((g, 1),)]

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.nx, m.nf = m.weight.shape[0], m.weight.shape[1]

    def check(self, m: nn.Module) -> bool:
        return tuple(m.weight.shape) == (m.nx, m.nf) and (m.bias is None or tuple(m.bias.shape) == (m.nf,))

    def unfold_reason(self, m: nn.Module) -> str | None:
        return "is a transformers Conv1D (its weight is [in, out], the transpose of a Linear's)"


if Conv1D is not None:
    register_rule(Conv1D, Conv1DRule())
    for _name in ELEMENTWISE_ACTIVATIONS:
        _cls = getattr(hf_activations, _name, None)
        if isinstance(_cls, type) and issubclass(_cls, nn.Module):
            register_rule(_cls, PassThroughRule())
# RMSNorms of model families: (modeling module, class, epsilon attribute). A family's modeling module costs
# seconds to import, so its rule is registered once the user's code has loaded it (`register_loaded`, run by
# every `analyze`).
FAMILY_RMSNORMS = (  # (..., gain offset: Gemma's norm multiplies by 1 + weight)
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "variance_epsilon", 0.0),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "variance_epsilon", 0.0),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "variance_epsilon", 0.0),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "variance_epsilon", 0.0),
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", "eps", 1.0),
    ("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm", "variance_epsilon", 0.0),
)


class PostNormBlockRule(LayerRule):
    """A block that normalises after its residual add (BERT's and RoBERTa's layers and embeddings: `LayerNorm(x +
    sublayer(x))`): traced into like any container, and marked post-norm, so a new stream unit (which would have to
    equal the mean of the normalised units, beyond a per-unit gain and bias) and a copy of the block as the identity
    are refused with that reason instead of being applied approximately."""

    leaf = False

    def post_norm(self, m: nn.Module) -> bool:
        return True


class GPT2AttentionRule(_HeadsAttentionRule):
    """transformers' GPT2Attention: `c_attn` (a Conv1D) writes q, k and v side by side, `split_size` each,
    `c_proj` reads the heads. Heads are the group `<name>.heads`; `split_size` and `num_heads` follow
    `c_attn`'s width (the forward splits by `split_size` and views heads of `head_dim`; `embed_dim`, the
    stream, follows `c_proj`'s output). Cross-attention (`q_attn`, keys from the encoder) is refused."""

    attrs = ("split_size", "num_heads", "embed_dim")

    def refuse(self, m: nn.Module) -> str | None:
        if getattr(m, "is_cross_attention", False) or hasattr(m, "q_attn"):
            return "is cross-attention (its keys and values come from the encoder; no rule for its q_attn)"
        return None

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        return [(f"{name}.c_attn.weight", 0, f"{name}.c_attn")]

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        return fused_projections(m, name, "c_attn", 1, "c_proj", 0, m.num_heads, m.split_size)

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        if not m.scale_attn_weights:  # unscaled logits (`scaling` 1, or 1/(layer+1) only)
            follow_head_dim(self, m, old, new, set_attr, "head_dim", ())
            return 1.0
        return follow_head_dim(self, m, old, new, set_attr, "head_dim", ("scaling",))

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        hd, e = m.head_dim, m.split_size
        qkv, proj = f"{name}.c_attn", f"{name}.c_proj"
        members = [Member(f"{qkv}.weight", 1, "producer", "weight", qkv, k * e, hd) for k in range(3)]
        if _bias(m.c_attn):
            members += [Member(f"{qkv}.bias", 0, "producer", "bias", qkv, k * e, hd) for k in range(3)]
        members.append(Member(f"{proj}.weight", 0, "consumer", "weight", proj, 0, hd))
        return e // hd, members

    def output_members(self, m: nn.Module, name: str) -> tuple[str, int, list[Member]]:
        proj = f"{name}.c_proj"
        members = [Member(f"{proj}.weight", 1, "producer", "weight", proj)]
        if _bias(m.c_proj):
            members.append(Member(f"{proj}.bias", 0, "producer", "bias", proj))
        return proj, m.c_proj.nf, members

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.split_size = m.c_attn.nf // 3
        m.num_heads = m.split_size // m.head_dim
        m.embed_dim = m.c_proj.nf

    def check(self, m: nn.Module) -> bool:
        if hasattr(m, "q_attn"):
            return True
        return (
            m.c_attn.nf == 3 * m.split_size == 3 * m.num_heads * m.head_dim
            and m.c_proj.nx == m.split_size
            and m.embed_dim == m.c_proj.nf
        )


class LlamaAttentionRule(_HeadsAttentionRule):
    """transformers' LlamaAttention (and attention classes shaped like it: q/k/v/o_proj Linears, `head_dim`,
    optionally `num_key_value_groups`, e.g. ViTAttention): one unit per key/value head, owning its `head_dim` k
    and v rows and the `num_key_value_groups * head_dim` rows of the query heads that share it (and their o_proj
    columns), so a new unit is a new KV head with its whole group of query heads. The forward reads `head_dim`
    and `num_key_value_groups` only, which a whole group keeps (a `num_attention_heads` attribute is re-derived);
    the config's head counts are not per layer and are left alone (replay the growth history to rebuild a grown
    model). `rotary`: the module rotates q and k by frequencies set from head_dim."""

    def __init__(self, rotary: bool = True, out: str = "o_proj") -> None:
        self.rotary, self.out = rotary, out  # `out`: the output projection's name (CLIP's and SigLIP's `out_proj`)
        self.attrs = ("num_attention_heads", "num_heads")

    def rotary_inputs(self, node: fx.Node) -> list[fx.Node]:
        if not self.rotary:
            return []
        cos_sin = node.kwargs.get("position_embeddings", node.args[1] if len(node.args) > 1 else None)
        return [cos_sin] if isinstance(cos_sin, fx.Node) else [n for n in cos_sin or () if isinstance(n, fx.Node)]

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        if self.rotary and not self.rotary_inputs(node):
            return "does not grow head_dim: its rotary cos/sin (`position_embeddings`) are not among its inputs"
        hd = m.head_dim
        parts = []
        for part, p in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            proj = getattr(m, p)
            bias = f"{name}.{p}.bias" if _bias(proj) else None
            parts.append(Projection(part, f"{name}.{p}.weight", 0, f"{name}.{p}", proj.out_features // hd, 0, bias))
        out = f"{name}.{self.out}"
        return parts + [Projection("output", f"{out}.weight", 1, out, m.q_proj.out_features // hd)]

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        for attr in ("num_attention_heads", "num_heads"):
            if attr in before:
                setattr(m, attr, m.q_proj.out_features // m.head_dim)

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        return [(f"{name}.{p}.weight", 1, f"{name}.{p}") for p in ("q_proj", "k_proj", "v_proj")]

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        hd, groups = m.head_dim, getattr(m, "num_key_value_groups", 1)
        members = []
        for p, inner in (("q_proj", groups * hd), ("k_proj", hd), ("v_proj", hd)):
            members.append(Member(f"{name}.{p}.weight", 0, "producer", "weight", f"{name}.{p}", 0, inner))
            if _bias(getattr(m, p)):
                members.append(Member(f"{name}.{p}.bias", 0, "producer", "bias", f"{name}.{p}", 0, inner))
        out = f"{name}.{self.out}"
        members.append(Member(f"{out}.weight", 1, "consumer", "weight", out, 0, groups * hd))
        return m.k_proj.out_features // hd, members

    def output_members(self, m: nn.Module, name: str) -> tuple[str, int, list[Member]]:
        o, proj = f"{name}.{self.out}", getattr(m, self.out)
        members = [Member(f"{o}.weight", 0, "producer", "weight", o)]
        if _bias(proj):
            members.append(Member(f"{o}.bias", 0, "producer", "bias", o))
        return o, proj.out_features, members

    def check(self, m: nn.Module) -> bool:
        hd, groups = m.head_dim, getattr(m, "num_key_value_groups", 1)
        kv = m.k_proj.out_features
        return (
            kv % hd == 0
            and m.v_proj.out_features == kv
            and m.q_proj.out_features == groups * kv
            and getattr(m, self.out).in_features == m.q_proj.out_features
        )


class QkNormAttentionRule(LlamaAttentionRule):
    """A Llama-shaped attention that normalises each head's queries and keys over their dims (Qwen3's `q_norm` and
    `k_norm`, one gain of head_dim shared by the heads): whole heads grow as Llama's; head_dim would move those
    norms' statistics, so it is refused with that reason."""

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        return "does not grow head_dim: its q_norm/k_norm normalise each head's dims (new dims would move them)"


class Phi3AttentionRule(LlamaAttentionRule):
    """Phi-3's attention: one fused `qkv_proj` (rows [query heads | key heads | value heads]) and `o_proj`. Its
    forward slices the queries by the config's head count, shared by every layer, so whole heads are refused; the
    stream and head_dim (by rotated pairs, with the rotary embedding) grow."""

    def __init__(self) -> None:
        super().__init__(rotary=True)

    @staticmethod
    def _shape(m: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head_dim)."""
        return m.config.num_attention_heads, m.num_key_value_heads, m.head_dim

    def heads_reason(self, m: nn.Module) -> str | None:
        return "does not grow heads: its forward slices the queries by the config's head count, shared by all layers"

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        return [(f"{name}.qkv_proj.weight", 1, f"{name}.qkv_proj")]

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        h, kv, hd = self._shape(m)
        qkv, groups = f"{name}.qkv_proj", h // kv
        members = [Member(f"{qkv}.weight", 0, "producer", "weight", qkv, offset, inner)
                   for offset, inner in ((0, groups * hd), (h * hd, hd), ((h + kv) * hd, hd))]
        members.append(Member(f"{name}.o_proj.weight", 1, "consumer", "weight", f"{name}.o_proj", 0, groups * hd))
        return kv, members

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        if not self.rotary_inputs(node):
            return "does not grow head_dim: its rotary cos/sin (`position_embeddings`) are not among its inputs"
        h, kv, hd = self._shape(m)
        qkv = f"{name}.qkv_proj"
        return [Projection("query", f"{qkv}.weight", 0, qkv, h, 0),
                Projection("key", f"{qkv}.weight", 0, qkv, kv, h * hd),
                Projection("value", f"{qkv}.weight", 0, qkv, kv, (h + kv) * hd),
                Projection("output", f"{name}.o_proj.weight", 1, f"{name}.o_proj", h)]

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        return None

    def check(self, m: nn.Module) -> bool:
        h, kv, hd = self._shape(m)
        return m.qkv_proj.out_features == (h + 2 * kv) * hd and m.o_proj.in_features == h * hd


class BertSelfAttentionRule(_HeadsAttentionRule):
    """transformers' BertSelfAttention: `query`/`key`/`value` Linears viewed to heads of `attention_head_size`;
    its output is the heads side by side, so the heads group is its output's units (`attention_head_size` per
    unit) and the next layer (BertSelfOutput's `dense`) reads them as any Linear does: a new head is new q/k/v
    rows and zero `dense` columns, exact even though BERT is post-norm (the stream does not change).
    `num_attention_heads`/`all_head_size` follow `query`'s width (the forward reads `attention_head_size`)."""

    attrs = ("num_attention_heads", "all_head_size")

    def head_dim_projections(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> list[Projection] | str:
        """Its heads are read by BertAttention's `output.dense` beside it (BertSelfOutput), outside this module."""
        dense = f"{name.rpartition('.')[0]}.output.dense"
        if not (isinstance(a.modules.get(dense), nn.Linear) and reads_output(a, node, dense)):
            return f"does not grow head_dim: no {dense!r} reads its heads directly (BertAttention's layout)"
        heads = m.num_attention_heads
        parts = []
        for p in ("query", "key", "value"):
            bias = f"{name}.{p}.bias" if _bias(getattr(m, p)) else None
            parts.append(Projection(p, f"{name}.{p}.weight", 0, f"{name}.{p}", heads, 0, bias))
        return parts + [Projection("output", f"{dense}.weight", 1, dense, heads)]

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return follow_head_dim(self, m, old, new, set_attr, "attention_head_size", ("scaling",))

    def stream_readers(self, m: nn.Module, name: str) -> list[tuple[str, int, str]]:
        return [(f"{name}.{p}.weight", 1, f"{name}.{p}") for p in ("query", "key", "value")]

    def head_size(self, m: nn.Module) -> int:
        return m.attention_head_size

    def output_members(self, m: nn.Module, name: str) -> None:
        return None

    def heads_members(self, m: nn.Module, name: str) -> tuple[int, list[Member]]:
        hd = m.attention_head_size
        members = []
        for p in ("query", "key", "value"):
            members.append(Member(f"{name}.{p}.weight", 0, "producer", "weight", f"{name}.{p}", 0, hd))
            if _bias(getattr(m, p)):
                members.append(Member(f"{name}.{p}.bias", 0, "producer", "bias", f"{name}.{p}", 0, hd))
        return m.query.out_features // hd, members

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        m.all_head_size = m.query.out_features
        m.num_attention_heads = m.all_head_size // m.attention_head_size

    def check(self, m: nn.Module) -> bool:
        q = m.query.out_features
        return (
            q == m.key.out_features == m.value.out_features == m.all_head_size
            and m.num_attention_heads * m.attention_head_size == q
        )


class RotaryEmbeddingRule(LayerRule):
    """transformers' LlamaRotaryEmbedding: `cos, sin = cat(f, f).cos(), cat(f, f).sin()` with `f = position *
    inv_freq`, so their last dim is the rotated pairs twice. The pairs are a group, `<name>.head_dim`, that every
    attention reading the cos/sin joins: the head_dim of all layers grows together, by pairs (a new pair in both
    halves of every head, its frequency continuing the old ones: `analysis.heads`). Refused for the dynamic and
    long rope types, which recompute their frequencies from the config's head_dim at run time: those are traced
    into, and their attentions say that head_dim does not grow."""

    def kept_whole(self, m: nn.Module) -> bool:
        rope = str(getattr(m, "rope_type", "default"))
        return "dynamic" not in rope and "longrope" not in rope

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        shapes = a.output_shapes(node)
        outs: list[Any] = [a.fixed(len(s)) if s is not None else None for s in shapes]
        if len(outs) != 2 or any(o is None for o in outs):
            return tuple(outs)
        pairs = a.new_group(m.inv_freq.numel(), f"{name}.head_dim")
        for buffer in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(m, buffer, None), torch.Tensor) and buffer in m._buffers:
                a.members[pairs].append(Member(f"{name}.{buffer}", 0, "producer", "inv_freq", name))
        a.constraints[pairs].append(Constraint("head_dim", name, 2))
        for out in outs:
            out[-1] = ((pairs, 1), (pairs, 1))
        return tuple(outs)

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        return 1.0  # its frequencies are buffers, completed by `analysis.heads`; no attribute follows head_dim


# Layers of model families: (modeling module, class, rule factory). Mistral and Qwen2 are Llama-shaped, RoBERTa
# BERT-shaped; a family not listed registers the rule of the shape it has for its classes (docs/architecture.md).
FAMILY_ATTENTIONS: tuple[tuple[str, str, Any], ...] = (
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Attention", GPT2AttentionRule),
    ("transformers.models.llama.modeling_llama", "LlamaAttention", LlamaAttentionRule),
    ("transformers.models.vit.modeling_vit", "ViTAttention", lambda: LlamaAttentionRule(rotary=False)),
    ("transformers.models.bert.modeling_bert", "BertSelfAttention", BertSelfAttentionRule),
    ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding", RotaryEmbeddingRule),
    ("transformers.models.mistral.modeling_mistral", "MistralAttention", LlamaAttentionRule),
    ("transformers.models.mistral.modeling_mistral", "MistralRotaryEmbedding", RotaryEmbeddingRule),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention", LlamaAttentionRule),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RotaryEmbedding", RotaryEmbeddingRule),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention", QkNormAttentionRule),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RotaryEmbedding", RotaryEmbeddingRule),
    ("transformers.models.gemma.modeling_gemma", "GemmaAttention", LlamaAttentionRule),
    ("transformers.models.gemma.modeling_gemma", "GemmaRotaryEmbedding", RotaryEmbeddingRule),
    ("transformers.models.phi3.modeling_phi3", "Phi3Attention", Phi3AttentionRule),
    ("transformers.models.phi3.modeling_phi3", "Phi3RotaryEmbedding", RotaryEmbeddingRule),
    ("transformers.models.clip.modeling_clip", "CLIPAttention", lambda: LlamaAttentionRule(False, "out_proj")),
    ("transformers.models.siglip.modeling_siglip", "SiglipAttention", lambda: LlamaAttentionRule(False, "out_proj")),
    ("transformers.models.roberta.modeling_roberta", "RobertaSelfAttention", BertSelfAttentionRule),
    ("transformers.models.bert.modeling_bert", "BertLayer", PostNormBlockRule),
    ("transformers.models.bert.modeling_bert", "BertEmbeddings", PostNormBlockRule),
    ("transformers.models.roberta.modeling_roberta", "RobertaLayer", PostNormBlockRule),
    ("transformers.models.roberta.modeling_roberta", "RobertaEmbeddings", PostNormBlockRule),
)


def register_loaded() -> None:
    """Register the family rules whose modeling module is loaded now."""
    for module_name, cls_name, eps_attr, offset in FAMILY_RMSNORMS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type) and cls not in LAYER_RULES:
            register_rule(cls, RMSNormRule(eps_attr, offset))
    for module_name, cls_name, rule in FAMILY_ATTENTIONS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type) and cls not in LAYER_RULES:
            register_rule(cls, rule())
