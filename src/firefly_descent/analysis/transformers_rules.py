"""Rules for Hugging Face transformers' own layers, registered only when transformers is importable.

* `Conv1D` (GPT-1/GPT-2): a Linear whose weight is stored transposed, [in, out], with forward
  `addmm(bias, x.view(-1, in), weight)`. Its weight's dim 0 reads the input's units (consumer), its dim 1
  and its bias start a new group (producer). Without this rule the analysis traces into it and its `addmm`
  blocks the residual stream. The weight-space baselines (`unfold_input`…) read a dense weight as
  [out, in], so this rule says the layer does not unfold for them rather than answer with the wrong layout.
* `LlamaRMSNorm` (`weight * x / sqrt(mean(x^2) + variance_epsilon)`), once `modeling_llama` is loaded:
  kept whole, an RMSNorm over the residual stream (`builtin_rules.RMSNormRule`), so the stream widens
  exactly. Traced into, its mean over the units blocks the stream.
* transformers' element-wise activation modules (`NewGELUActivation` in GPT-2's MLP, …): units pass
  through. Traced into, their `torch.pow` and the like have no channel rule and would block the MLP.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .builtin_rules import RMSNormRule
from .graph import Member
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
FAMILY_RMSNORMS = (("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "variance_epsilon"),)


def register_loaded() -> None:
    """Register the family rules whose modeling module is loaded now."""
    for module_name, cls_name, eps_attr in FAMILY_RMSNORMS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(cls, type) and cls not in LAYER_RULES:
            register_rule(cls, RMSNormRule(eps_attr))
