"""Capture a model's graph without touching its real memory.

We deep-copy the model onto the meta device (parameters become shape-only tensors, no data is
copied), trace it with `torch.fx`, and propagate shapes with meta inputs. Module qualified names
are identical to the live model's, so the analysis speaks in the live model's names.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import DataDependentControlFlowError, GrowthError

# Standard modules the analysis has rules for; they stay leaves in the traced graph.
LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.MultiheadAttention,
)


def meta_copy(model: nn.Module) -> nn.Module:
    """Deep copy of `model` whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, object] = {}
    for p in model.parameters(recurse=True):
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers(recurse=True):
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class _Tracer(fx.Tracer):
    def __init__(self, extra_leaves: Sequence[type[nn.Module]], leaf_names: set[str], stack_traces: bool) -> None:
        super().__init__()
        self.record_stack_traces = stack_traces
        self.extra_leaves = tuple(extra_leaves)
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, LEAF_TYPES + self.extra_leaves):
            return True
        return super().is_leaf_module(m, qualname)


def as_input_tuple(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """A model's positional inputs as a tuple (one tensor or a tuple/list of tensors)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise GrowthError("example_inputs must be a tensor or a tuple of tensors (one batch the model accepts)")


def trace_with_shapes(
    model: nn.Module,
    example_inputs: object,
    extra_leaves: Sequence[type[nn.Module]] = (),
    leaf_names: set[str] | None = None,
    stack_traces: bool = False,
) -> fx.GraphModule:
    """Trace a meta copy of `model` and annotate every node with its output shape (`node.meta['tensor_meta']`)."""
    inputs = as_input_tuple(example_inputs)
    meta_model = meta_copy(model)
    tracer = _Tracer(extra_leaves, leaf_names or set(), stack_traces)
    try:
        graph = tracer.trace(meta_model)
    except fx.proxy.TraceError as e:
        where = _user_frame_of_exception(e)
        raise DataDependentControlFlowError(
            f"{type(model).__name__}.forward branches on tensor values{where}, so its graph cannot be captured; "
            "make the control flow static or wrap that part in a module passed to `exclude=`"
        ) from None
    gm = fx.GraphModule(meta_model, graph)
    meta_inputs = [torch.empty_like(t, device="meta") for t in inputs]
    try:
        ShapeProp(gm).propagate(*meta_inputs)
    except Exception as e:  # noqa: BLE001 - report any failure as one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GrowthError(
            f"the model does not run on the example inputs (shapes {[tuple(t.shape) for t in inputs]}): {msg}"
        ) from None
    return gm


def _user_frame_of_exception(e: BaseException) -> str:
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


NO_SOURCE = "(source line not recorded)"


def source_of(node: fx.Node) -> str:
    """`file.py:12 `code`` of the user's line that created `node`, for error messages (a marker when the
    graph was traced without stack traces; `analyze` then traces again with them)."""
    if node.stack_trace is None:
        return f"node {node.name} {NO_SOURCE}"
    trace = node.stack_trace or ""
    lines = trace.splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File ") and f"{os.sep}torch{os.sep}" not in line:
            try:
                path = line.split('"')[1]
                lineno = line.split("line ")[1].split(",")[0]
            except IndexError:
                continue
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{os.path.basename(path)}:{lineno} `{code}`"
    return f"node {node.name} ({node.target})"
