"""One rule per layer type: everything the library knows about a module type, in one place.

A `LayerRule` holds both halves of a layer type's knowledge:

* the analysis half, `propagate`: how the module's parameters couple to the channels of its inputs
  and outputs (which (tensor, dim) read a group's units, which start a new group, which pass through);
* the engine half, `rederive` / `check` / `validate`: how the module's attributes (`in_features`,
  `groups`, `num_heads`…) follow its tensors after growth, whether they agree, and which changes a
  constraint the rule recorded (GroupNorm groups, attention heads) can take exactly.

Built-in layers are registered with `register_rule` exactly as user layers are (see `builtin_rules`),
in the manner of Torch-Pruning's per-layer pruners. Adding a layer type is one rule in one file.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ApproximationRequiredError
from .graph import ON_REQUEST, Constraint, Group, Member

if TYPE_CHECKING:
    from .propagate import Propagation


class LayerRule:
    """How one module type grows. Subclass and register with `register_rule(Type, rule)`.

    `leaf`: the module stays one node in the captured graph (its forward is not traced into).
    `attrs`: attributes the engine snapshots before an edit (restored on rollback, passed to `rederive`).
    """

    leaf: bool = True
    attrs: tuple[str, ...] = ()

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        """Analysis: record members/groups for the module's parameters and return the output layout."""
        return a.block_unknown(node, f"module {name!r} ({type(m).__name__})")

    def kept_whole(self, m: nn.Module) -> bool:
        """Whether this module stays one node in the captured graph (`leaf`, unless the rule looks closer)."""
        return self.leaf

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        """Engine: make the module's attributes agree with its (resized) tensors."""

    def check(self, m: nn.Module) -> bool:
        """Engine: True when the module's attributes agree with its tensors."""
        return True

    # ---- what the growth methods ask (the defaults describe a layer none of this applies to) ----------
    running_stats: bool = False  # a normalisation with running statistics (BatchNorm): see `batchnorms`
    attention: bool = False  # attention: a block holding it is copied whole as a new depth candidate
    linear_map: bool = False  # its output is its input times its weight (+ bias): zero weights, zero output
    residual: bool = False  # a growth-inserted residual wrapper z + s·h(z) (its inside may feed itself)

    def post_norm(self, m: nn.Module) -> bool:
        """Whether `m` is a block that normalises after its residual add: a copy of it cannot start as the
        identity."""
        return False

    def unfold_reason(self, m: nn.Module) -> str | None:
        """Why `m`'s weight does not multiply an unfolded input row by row (None: it does, and
        `unfold_input`, `output_rows`, `run_with` and `conv_geometry` answer for it). Phrased to follow
        "the layer": "is a grouped convolution"."""
        return f"is a {type(m).__name__} (no rule says how its input unfolds)"

    def per_channel(self, m: nn.Module) -> bool:
        """Whether each output unit reads only its own input channel (a depthwise convolution)."""
        return False

    def unfold_input(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The rows unit i's incoming vector θ_i (its weight row flattened, then its bias if any) multiplies:
        [rows, D] with `output_rows(m, m(x))[:, i] == X @ θ_i`, or [rows, C, D] when each unit reads only
        its own channel (a depthwise convolution)."""
        raise NotImplementedError(f"{type(m).__name__} {self.unfold_reason(m)}")

    def output_rows(self, m: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The layer's output (or a tensor shaped like it) as [rows, units], rows in `unfold_input`'s order."""
        raise NotImplementedError(f"{type(m).__name__} {self.unfold_reason(m)}")

    def run_with(
        self, m: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer's forward on `x` with other weights (same geometry; any number of output units)."""
        raise NotImplementedError(f"{type(m).__name__} {self.unfold_reason(m)}")

    def conv_geometry(self, m: nn.Module) -> dict[str, tuple[int, ...]] | None:
        """kernel/stride/padding/dilation per spatial dim of a convolution; None for a dense layer whose
        weight [out, in] reads the input's last dim."""
        return None

    def set_head_dim(self, m: nn.Module, old: int, new: int, set_attr: Callable[[nn.Module, str, Any], None]) -> float:
        """Engine, after the head_dim group this rule recorded grew from `old` to `new` dims per head: set the
        attributes that follow it through `set_attr` (logged for rollback) and return the factor its query rows
        take so the logits keep their scale (`analysis.heads.follow_head_dim` for the usual attributes)."""
        raise NotImplementedError(f"{type(m).__name__}'s rule records no head_dim group")

    def norm_eps(self, m: nn.Module) -> tuple[str, float] | None:
        """For a normalisation over a group's units: the attribute holding its epsilon and the value it uses
        (a completion rescales it when new units join). None: this rule knows no epsilon to set."""
        return None


class PassThroughRule(LayerRule):
    """Activations, dropout, identity: each unit flows through unchanged."""

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        x = next((arg for arg in node.args if isinstance(arg, fx.Node)), None)
        lay = a.layout(x) if x is not None else None
        if lay is None and x is not None and a.shape(x) is not None:
            return a.fixed(len(a.shape(x)))
        return list(lay) if lay is not None else None


def with_bias_column(X: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """Append the column of ones a unit's bias multiplies, when `m` has a bias."""
    if getattr(m, "bias", None) is None:
        return X
    return torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype, device=X.device)], -1)


def unfold_patches(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int]) -> torch.Tensor:
    """[B, C, *spatial] -> [B*L, C*prod(kernel)]: every output position's input patch (1, 2 or 3 spatial
    dims), rows in (batch, position) order, columns in a flattened weight row's (channel, offset) order."""
    n = len(kernel)
    if n == 1:
        x = x.unsqueeze(-2)
        kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    if n <= 2:
        cols = F.unfold(x, tuple(kernel), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    x = F.pad(x, [p for d in reversed(range(n)) for p in (padding[d], padding[d])])
    for d in range(n):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])  # [B, C, *out, *spans]
    x = x[(..., *[slice(None, None, dl) for dl in dilation])]  # [B, C, *out, *kernel]
    B, C = x.shape[:2]
    out = x.shape[2:2 + n]
    return x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)).reshape(B * math.prod(out), -1)


def batchnorms(model: nn.Module, tracking: bool = False) -> list[nn.Module]:
    """The normalisations with running statistics in `model` (their rule's `running_stats`), in module order;
    `tracking=True`: only those that hold running statistics now (`running_mean` is not None)."""
    return [m for m in model.modules() if is_batchnorm(m) and (not tracking or m.running_mean is not None)]


def is_batchnorm(m: nn.Module | None) -> bool:
    """Whether `m` is a normalisation with running statistics (its rule says so)."""
    rule = rule_for(m) if m is not None else None
    return rule is not None and rule.running_stats


def is_attention(m: nn.Module | None) -> bool:
    """Whether `m` is an attention layer (its rule says so)."""
    rule = rule_for(m) if m is not None else None
    return rule is not None and rule.attention


def is_post_norm(m: nn.Module | None) -> bool:
    """Whether `m` is a post-norm block (its rule says so)."""
    rule = rule_for(m) if m is not None else None
    return rule is not None and rule.post_norm(m)


def is_residual(m: nn.Module | None) -> bool:
    """Whether `m` is a growth-inserted residual wrapper (its rule says so)."""
    rule = rule_for(m) if m is not None else None
    return rule is not None and rule.residual


LAYER_RULES: dict[type[nn.Module], LayerRule] = {}

# Constraint kind -> check(constraint, group, split_units, new_count, approximate); raises when the change
# cannot be applied exactly. Registered by the rule that records constraints of that kind.
ConstraintCheck = Callable[[Constraint, Group, Sequence[int], int, bool], None]
CONSTRAINT_CHECKS: dict[str, ConstraintCheck] = {}


class GrownGroup(Protocol):
    """What a constraint's completion sees of one group change, inside the engine's transaction, after every
    tensor was resized and filled from the plan: the live grown tensors, where the change's units sit in
    them, and an attribute setter the transaction logs (so rollback and `Undo` restore what it sets)."""

    model: nn.Module
    change: Any  # plan.GroupChange (the plan module imports this one)

    def tensor(self, name: str) -> torch.Tensor:
        """The grown tensor `name` (edit it in place, under `torch.no_grad()`)."""
        ...

    def positions(self, member: Member, kind: str) -> torch.Tensor:
        """[units, inner] positions along `member.dim` of the change's "old", "twin" or "new" units, in order."""
        ...

    def module(self, name: str) -> nn.Module: ...

    def set_attr(self, module: nn.Module, attr: str, value: Any) -> None:
        """Set a module attribute the engine restores on rollback or undo."""
        ...


# Constraint kind -> complete(constraints, grown): run by the engine once per changed group and kind (with
# every constraint of that kind on the group) after the resize, unless the plan is `approximate`. It rewrites
# the values that the constraint fixes so the change is exact (a LayerNorm'd group's new units made the mean
# of the old ones, the norms' gains and eps rescaled); it may raise `ApproximationRequiredError`, which rolls
# the whole plan back.
ConstraintComplete = Callable[[list[Constraint], GrownGroup], None]
CONSTRAINT_COMPLETIONS: dict[str, ConstraintComplete] = {}
# Constraint kind -> roles whose new-unit slices its completion decides (a grower's values there are
# overwritten, so a method need not propose them).
COMPLETED_ROLES: dict[str, tuple[str, ...]] = {}
# Constraint kinds under which a split must duplicate every unit of the group exactly once (or none).
WHOLE_SPLITS: set[str] = set()
# Constraint kinds whose completion also keeps module attributes true (head_dim): run for approximate plans too.
STRUCTURAL: set[str] = set()
# Constraint kind -> the kinds whose completions it runs after on the same group (nn.MultiheadAttention's head_dim
# grows a LayerNorm'd stream: the norm's completion first, then the query/key edits); other pairs disagree.
COMPLETES_AFTER: dict[str, frozenset[str]] = {}
# Constraint kind -> new_slices(old, dim): the completed producers' new-unit slice as a differentiable function
# of the old units' slices stacked along `dim` (size 1 along `dim`; the mean, or zero). A method that perturbs
# the old slices while it trains (an over-grown copy) applies it to keep the completion true.
NewSlices = Callable[[torch.Tensor, int], torch.Tensor]
NEW_SLICES: dict[str, NewSlices] = {}
# Constraint kind -> reason(constraints, group, model): why the completion cannot make new units of `group` exact
# in `model` (None: it can). The completion raises with it; a method asks it before proposing new units.
CompletionReason = Callable[[list[Constraint], Group, nn.Module], "str | None"]
COMPLETION_REASONS: dict[str, CompletionReason] = {}


def register_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Teach the analysis and the engine how `module_type` (and its subclasses) grows."""
    LAYER_RULES[module_type] = rule


def unregister_rule(module_type: type[nn.Module]) -> None:
    LAYER_RULES.pop(module_type, None)


def register_constraint(
    kind: str,
    check: ConstraintCheck,
    complete: ConstraintComplete | None = None,
    *,
    completes: Sequence[str] = (),
    whole_splits: bool = False,
    new_slices: NewSlices | None = None,
    reason: CompletionReason | None = None,
    on_request: bool = False,
    structural: bool = False,
    after: Sequence[str] = (),
) -> None:
    """Say how the engine validates a change to a group carrying a constraint of `kind` (`check`), and,
    optionally, how it completes an accepted change exactly (`complete`, with the member roles whose new
    slices it decides in `completes`, `new_slices`, those slices as a function of the old ones, and `reason`,
    why it cannot complete new units in a given model); `whole_splits`: a split duplicates every unit or none;
    `on_request`: growers leave such a group alone unless it is named (`GrowthGraph.growable`); `structural`: the
    completion also sets module attributes, so it runs for approximate plans too; `after`: kinds whose completions
    may share a group with this one, which then runs after them."""
    CONSTRAINT_CHECKS[kind] = check
    for table in (CONSTRAINT_COMPLETIONS, COMPLETED_ROLES, NEW_SLICES, COMPLETION_REASONS, COMPLETES_AFTER):
        table.pop(kind, None)
    if after:
        COMPLETES_AFTER[kind] = frozenset(after)
    for kinds in (WHOLE_SPLITS, ON_REQUEST, STRUCTURAL):
        kinds.discard(kind)
    if on_request:
        ON_REQUEST.add(kind)
    if structural:
        STRUCTURAL.add(kind)
    if new_slices is not None:
        NEW_SLICES[kind] = new_slices
    if reason is not None:
        COMPLETION_REASONS[kind] = reason
    if complete is not None:
        CONSTRAINT_COMPLETIONS[kind] = complete
        COMPLETED_ROLES[kind] = tuple(completes)
    if whole_splits:
        WHOLE_SPLITS.add(kind)


def completion_order(kinds: Sequence[str]) -> list[str] | None:
    """The order in which completions of `kinds` run on one group: the one that declares no `after` first, then
    those that run after it; None when they disagree (two independent completions, or one not declared)."""
    first = [k for k in kinds if k not in COMPLETES_AFTER]
    rest = [k for k in kinds if k in COMPLETES_AFTER]
    if len(first) > 1 or any(not set(first) <= COMPLETES_AFTER[k] for k in rest) or len(rest) > 1:
        return None
    return first + rest


def completed_roles(group: Group) -> set[str]:
    """Member roles whose new-unit values the group's constraints' completions decide (a method's values for
    them are overwritten by the engine)."""
    return {r for c in group.constraints for r in COMPLETED_ROLES.get(c.kind, ())}


def completed_new_slices(group: Group) -> NewSlices | None:
    """How the completion of `group`'s constraints derives its producers' new slices from the old ones (None:
    no completion, or completions that disagree)."""
    fns = {id(NEW_SLICES[c.kind]): NEW_SLICES[c.kind] for c in group.constraints if c.kind in NEW_SLICES}
    return next(iter(fns.values())) if len(fns) == 1 else None


def completion_reason(group: Group, model: nn.Module) -> str | None:
    """Why new units of `group` cannot be completed exactly in `model` (a post-norm block, a norm without a
    gain...), or None."""
    kinds: dict[str, list[Constraint]] = {}
    for c in group.constraints:
        if c.kind in COMPLETION_REASONS:
            kinds.setdefault(c.kind, []).append(c)
    for kind, cs in kinds.items():
        why = COMPLETION_REASONS[kind](cs, group, model)
        if why is not None:
            return why
    return None


def takes_new_units(group: Group) -> bool:
    """Whether new units fit every constraint of `group` exactly: none, whole blocks, a Linear along another dim
    (`across`), units made of several rows of one layer (`parts`, a GLU) or an activation on the raw units
    (`nonlinear`) — free unless a norm completes the group: its reason refuses — or a completion."""
    return all(
        c.kind in ("blocks", "across", "parts", "nonlinear") or c.kind in CONSTRAINT_COMPLETIONS
        for c in group.constraints
    )


def splits_whole_only(group: Group) -> bool:
    """Whether a split of `group` must duplicate every unit once (a norm over the units: LayerNorm, RMSNorm)."""
    return any(c.kind in WHOLE_SPLITS for c in group.constraints)


def load_optional_rules() -> None:
    """Register the rules for transformers' and timm's own layers once a model could use them: only when the
    user's code has imported the package (importing it here would cost every analysis a second of start-up).
    Run by `analyze` and by every engine apply (a plan replayed in a fresh process needs the rules too)."""
    if "transformers" in sys.modules:
        importlib.import_module(".transformers_rules", __package__).register_loaded()
    if "timm" in sys.modules:  # likewise timm's (importing it costs seconds)
        importlib.import_module(".timm_rules", __package__).register_loaded()


def rule_for(m: nn.Module) -> LayerRule | None:
    """The rule of the most specific registered type of `m` (a subclass's own rule wins)."""
    for t in type(m).__mro__:
        rule = LAYER_RULES.get(t)
        if rule is not None:
            return rule
    return None


def leaf_types() -> tuple[type[nn.Module], ...]:
    return tuple(t for t, r in LAYER_RULES.items() if r.leaf)


def is_leaf(m: nn.Module) -> bool | None:
    """Whether the rule of `m` keeps it one node in the captured graph (None: no rule)."""
    rule = rule_for(m)
    return None if rule is None else rule.kept_whole(m)


def snapshot_attrs(m: nn.Module) -> dict[str, Any]:
    """The attributes the rules of `m` re-derive, to restore on rollback."""
    rule = rule_for(m)
    names = rule.attrs if rule is not None else ()
    return {a: getattr(m, a) for a in names if hasattr(m, a)}


def whole_blocks(
    what: str, c: Constraint, group: Group, split_units: Sequence[int], new_count: int, approximate: bool
) -> None:
    """Shared check for constraints that grow by whole blocks of `c.channels_per_group` units (GroupNorm
    groups, grouped-conv groups, attention heads): new units come in whole blocks, and a split copies
    whole blocks, each block's units in order, so every twin block is an exact copy."""
    cpg = c.channels_per_group
    ok = new_count % cpg == 0 and len(split_units) % cpg == 0 and len(set(split_units)) == len(split_units)
    if ok:
        for i in range(0, len(split_units), cpg):
            block = list(split_units[i : i + cpg])
            start = (block[0] // cpg) * cpg
            ok &= block == list(range(start, start + cpg))
    if not ok:
        raise ApproximationRequiredError(
            f"group {group.name!r} is {what} {c.module!r} in blocks of {cpg} units: it grows by whole blocks "
            f"only (split every unit of a block, in order; add multiples of {cpg})"
        )


# ---- the declarative rule for opaque user modules --------------------------------------------------
class ModuleRule(LayerRule):
    """How an opaque module's parameters follow the widths of its inputs and outputs (declarative).

    consumes: (arg index, dim, [(param name, param dim)]) - the param dims that read an input's units.
    produces: (output index or None for a single tensor, dim, [(param name, param dim)]) - a new group.
    passes:   (arg index, in dim, output index or None, out dim) - units flow through unchanged.
    rederive: called after the engine edited the module's parameters, to update its attributes.
    blocks:   (output index or None, dim, units per block) - the produced group grows by whole blocks
              (attention heads); the engine refuses other changes.
    """

    def __init__(
        self,
        consumes: list[tuple[int, int, list[tuple[str, int]]]] | None = None,
        produces: list[tuple[int | None, int, list[tuple[str, int]]]] | None = None,
        passes: list[tuple[int, int, int | None, int]] | None = None,
        rederive: Callable[[nn.Module], None] | None = None,
        blocks: list[tuple[int | None, int, int]] | None = None,
    ) -> None:
        self.consumes = list(consumes or [])
        self.produces = list(produces or [])
        self.passes = list(passes or [])
        self.rederive_fn = rederive
        self.blocks = list(blocks or [])

    def propagate(self, a: Propagation, node: fx.Node, m: nn.Module, name: str) -> Any:
        args = list(node.args)
        out_shapes = a.output_shapes(node)
        multi = a.has_multiple_outputs(node)
        outs: list[Any] = [a.fixed(len(s)) if s is not None else None for s in out_shapes]
        handled: set[tuple[int, int]] = set()
        for arg_i, dim, params in self.consumes:
            lay, s = a.layout_or_fixed(args[arg_i])
            d = a.norm_dim(dim, len(s))
            handled.add((arg_i, d))
            for pname, pdim in params:
                a.add_members(lay[d], f"{name}.{pname}", pdim, "consumer", "weight", name)
        for arg_i, in_dim, out_i, out_dim in self.passes:
            lay, s = a.layout_or_fixed(args[arg_i])
            oi = out_i or 0
            outs[oi][a.norm_dim(out_dim, len(out_shapes[oi]))] = lay[a.norm_dim(in_dim, len(s))]
            handled.add((arg_i, a.norm_dim(in_dim, len(s))))
        for out_i, dim, params in self.produces:
            oi = out_i or 0
            d = a.norm_dim(dim, len(out_shapes[oi]))
            g = a.new_group(out_shapes[oi][d], name)
            for pname, pdim in params:
                kind = "bias" if pname.endswith("bias") else "weight"
                a.members[g].append(Member(f"{name}.{pname}", pdim, "producer", kind, name))
            for b_out, b_dim, per_block in self.blocks:
                if (b_out or 0) == oi and a.norm_dim(b_dim, len(out_shapes[oi])) == d:
                    a.constraints[g].append(Constraint("blocks", name, per_block))
            outs[oi][d] = ((g, 1),)
        for i, arg in enumerate(args):
            lay = a.layout(arg) if a.shape(arg) is not None else None
            for d, dl in enumerate(lay or []):
                if dl is not None and (i, d) not in handled:
                    a.block_layout(
                        [dl], "UnsupportedOpError", f"module rule of {name!r} does not say how input {i} dim {d} grows"
                    )
        return tuple(outs) if multi else outs[0]

    def rederive(self, m: nn.Module, before: dict[str, Any]) -> None:
        if self.rederive_fn is not None:
            self.rederive_fn(m)


def register_module_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Teach the analysis (and the engine) how an opaque module type grows (same as `register_rule`)."""
    register_rule(module_type, rule)


register_constraint("blocks", lambda c, g, s, n, ap: whole_blocks("grown by", c, g, s, n, ap))
