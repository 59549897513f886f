"""Capture a model's graph without touching its real memory.

We deep-copy the model onto the meta device (parameters become shape-only tensors, no data is
copied), trace it with `torch.fx`, and propagate shapes with meta inputs. Module qualified names
are identical to the live model's, so the analysis speaks in the live model's names.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import DataDependentControlFlowError, GrowthError


def meta_copy(model: nn.Module) -> nn.Module:
    """Deep copy of `model` whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, object] = {}
    for p in model.parameters(recurse=True):
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers(recurse=True):
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class _Tracer(fx.Tracer):
    """Symbolic tracer keeping registered layer types (and excluded modules) as leaves; remembers the
    module it is inside, so a failure can name it."""

    def __init__(
        self,
        extra_leaves: Sequence[type[nn.Module]],
        leaf_names: set[str],
        stack_traces: bool,
        is_leaf: Callable[[nn.Module], bool | None] | None = None,
    ) -> None:
        super().__init__()
        self.is_leaf = is_leaf
        self.record_stack_traces = stack_traces
        self.extra_leaves = tuple(extra_leaves)
        self.leaf_names = leaf_names
        self._paths: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names:
            return True
        verdict = self.is_leaf(m) if self.is_leaf is not None else None
        if verdict is not None:
            return verdict
        if isinstance(m, self.extra_leaves):
            return True
        if next(m.children(), None) is not None and not isinstance(m, nn.Sequential):
            return False  # a torch.nn container without a rule (TransformerEncoderLayer): trace into it
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:  # made inside forward (`CrossEntropyLoss()(logits, labels)`): stateless, trace into it
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
                raise
            return forward(*args, **kwargs)
        self._paths.append(f"{path or '(root)'} ({type(m).__name__})")
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._paths[-1]
            raise
        finally:
            self._paths.pop()
        return out


class _ShapeProxy(fx.Proxy):
    """A proxy that also carries the value the op computes on meta tensors, so shape queries
    (`x.shape`, `x.size(1)`, `x.dim()`, `len(x)`, `x.dtype`) give concrete answers and control flow on
    shapes can run. Control flow on tensor *values* still fails (meta tensors have no values)."""

    @property
    def _value(self) -> Any:
        return self.node.meta.get("_meta_value")

    def _tensor(self) -> torch.Tensor | None:
        v = self._value
        return v if isinstance(v, torch.Tensor) else None

    def size(self, dim: int | None = None) -> Any:
        t = self._tensor()
        if t is None:
            return self.tracer.create_proxy("call_method", "size", (self, dim) if dim is not None else (self,), {})
        return t.size() if dim is None else t.size(dim)

    def dim(self) -> Any:
        t = self._tensor()
        return t.dim() if t is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def __len__(self) -> int:
        t = self._tensor()
        if t is None:
            raise RuntimeError("len() of a traced value whose shape is unknown")
        return len(t)

    def __getattr__(self, k: str) -> Any:
        t = self._tensor()
        if t is not None and k in ("shape", "ndim", "dtype", "is_cuda", "is_sparse", "is_nested", "layout"):
            return getattr(t, k)
        return super().__getattr__(k)


def _meta_of(x: Any) -> Any:
    if isinstance(x, fx.Proxy):
        v = x.node.meta.get("_meta_value")
        if v is None:
            raise _NoMeta
        return v
    return x


class _NoMeta(Exception):
    pass


class _RunningTracer(_Tracer):
    """The fallback capture: traces like `_Tracer` but also *runs* each op on meta tensors, so Python
    code that inspects shapes, dtypes or ranks (stock transformer layers, shape-dependent branches)
    is followed with the example input's shapes."""

    def __init__(self, inputs: Sequence[torch.Tensor], *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.inputs = list(inputs)
        self.n_placeholders = 0
        self.running = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    # while an op runs on meta tensors, the tracer's patches must let it run untraced
    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self.running:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any) -> fx.Proxy:
        p = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if self.running:
            return p
        self.running = True
        try:
            value = self._run(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot run on meta tensors stays symbolic
            value = None
        finally:
            self.running = False
        p.node.meta["_meta_value"] = value
        return p

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            i = self.n_placeholders
            self.n_placeholders += 1
            return self.inputs[i] if i < len(self.inputs) else None
        if kind == "get_attr":
            obj: Any = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        args = fx.node.map_aggregate(args, _meta_of)
        kwargs = fx.node.map_aggregate(kwargs, _meta_of)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return None


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
    is_leaf: Callable[[nn.Module], bool | None] | None = None,
) -> fx.GraphModule:
    """Capture a meta copy of `model` and annotate every node with its output shape (`node.meta['tensor_meta']`).

    First a symbolic `torch.fx` trace; when that fails (Python code inspecting shapes, stock transformer
    layers), a trace that also runs every op on meta tensors. When both fail: one line naming the module
    and the reason.
    """
    inputs = as_input_tuple(example_inputs)
    meta_model = _unwrapped_forward(meta_copy(model))
    meta_inputs = [torch.empty_like(t, device="meta") for t in inputs]
    defaults = _defaulted_args(meta_model, len(inputs))
    tracer = _Tracer(extra_leaves, leaf_names or set(), stack_traces, is_leaf)
    try:
        graph = tracer.trace(meta_model, concrete_args=defaults)
    except Exception:  # noqa: BLE001 - fall back to the capture that runs the code
        running = _RunningTracer(meta_inputs, extra_leaves, leaf_names or set(), stack_traces, is_leaf)
        try:
            graph = running.trace(meta_model, concrete_args=defaults)
        except fx.proxy.TraceError as e:
            where = _user_frame_of_exception(e)
            raise DataDependentControlFlowError(
                f"{type(model).__name__}.forward branches on tensor values{where}{_inside(running)}, so its graph "
                "cannot be captured; make the control flow static or wrap that part in a module passed to `exclude=`"
            ) from None
        except Exception as e:  # noqa: BLE001 - report any failure as one line
            raise GrowthError(
                f"cannot capture the graph of {type(model).__name__}{_inside(running)}: {_one_line(e)}; "
                "register a layer rule for that module or pass it to `exclude=`"
            ) from None
    gm = fx.GraphModule(meta_model, graph)
    for node in gm.graph.nodes:
        node.meta.pop("_meta_value", None)
    prop = _ShapeProp(gm, {name: model.get_submodule(name) for name in leaf_names or () if _has_submodule(model, name)})
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before raising
            prop.propagate(*meta_inputs)
    except Exception as e:  # noqa: BLE001 - report any failure as one line
        cause = e.__cause__ or e
        raise GrowthError(
            f"{type(model).__name__} does not run on the example inputs (shapes {[tuple(t.shape) for t in inputs]}) "
            f"on meta tensors: {_one_line(cause)}"
        ) from None
    return gm


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


class _ShapeProp(ShapeProp):
    """Shapes on meta tensors; an excluded module whose code cannot run on them (it branches on values) is run
    once, in eval mode and without gradients, as the real module on zeros of its inputs' shapes (its output's
    shape is all the analysis needs from an opaque module)."""

    def __init__(self, gm: fx.GraphModule, originals: dict[str, nn.Module]) -> None:
        super().__init__(gm)
        self.originals = originals

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(target, args, kwargs)
        except Exception:
            real = self.originals.get(str(target))
            if real is None:
                raise
        ref = next((t for t in real.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "meta" else torch.device("cpu")

        def zeros(t: Any) -> Any:
            return torch.zeros(t.shape, dtype=t.dtype, device=device) if isinstance(t, torch.Tensor) else t

        def meta(t: Any) -> Any:
            return torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t

        was = real.training
        real.eval()
        try:
            with torch.no_grad():
                out = real(*torch.utils._pytree.tree_map(zeros, args), **torch.utils._pytree.tree_map(zeros, kwargs))
        finally:
            real.train(was)
        return torch.utils._pytree.tree_map(meta, out)


def _unwrapped_forward(model: nn.Module) -> nn.Module:
    """`model` (a meta copy), its class's forward undecorated when a decorator wraps it in `(*args, **kwargs)`
    (Hugging Face's `can_return_tuple`): torch.fx patches the wrapper's code with the inner signature's
    arguments and fails. Only the analysis's copy changes; the decorators only shape the output container."""
    cls = type(model)
    inner = inspect.unwrap(cls.forward)
    if inner is cls.forward:
        return model
    model.__class__ = type(cls.__name__, (cls,), {"forward": _fixed_arity(inner), "__module__": cls.__module__})
    return model


def _fixed_arity(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` without its `*args`/`**kwargs` (they stay empty): torch.fx would make them proxies, and a
    `**kwargs` passed on to a submodule cannot be unpacked while tracing. A `use_cache` argument defaults
    to False (a Hugging Face key/value cache object cannot be traced, and one forward needs none)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    kept = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(kept) == len(params) or not kept:
        return fn
    defaults = {p.name: p.default for p in kept if p.default is not p.empty}
    if "use_cache" in defaults:  # Hugging Face: a key/value cache object cannot be traced, and one call needs none
        defaults["use_cache"] = False
    heads, calls, star = [], [], False
    for i, p in enumerate(kept):
        if p.kind == p.KEYWORD_ONLY and not star:
            heads.append("*")
            star = True
        heads.append(f"{p.name}=_d[{p.name!r}]" if p.name in defaults else p.name)
        calls.append(p.name if i == 0 or p.kind == p.POSITIONAL_ONLY else f"{p.name}={p.name}")
    namespace: dict[str, Any] = {"_d": defaults, "_fn": fn}
    exec(f"def forward({', '.join(heads)}):\n    return _fn({', '.join(calls)})\n", namespace)  # noqa: S102
    out = namespace["forward"]
    out.__qualname__, out.__doc__ = fn.__qualname__, fn.__doc__
    return out


def _defaulted_args(model: nn.Module, n_inputs: int) -> dict[str, Any] | None:
    """forward's parameters after the given inputs keep their defaults (masks stay None while tracing)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out = {p.name: p.default for p in positional[n_inputs:] if p.default is not p.empty}
    return out or None


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0].strip() if str(e).strip() else ""
    msg = msg if len(msg) <= 200 else msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _inside(tracer: _Tracer) -> str:
    return f" (in module {tracer.failed_in})" if tracer.failed_in else ""


def _user_frame_of_exception(e: BaseException) -> str:

    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


NO_SOURCE = "(source line not recorded)"
_HERE = os.path.dirname(os.path.abspath(__file__))  # frames of the analysis itself are never the user's line


def source_of(node: fx.Node) -> str:
    """`file.py:12 `code`` of the user's line that created `node`, for error messages (a marker when the
    graph was traced without stack traces; `analyze` then traces again with them)."""
    if node.stack_trace is None:
        return f"node {node.name} {NO_SOURCE}"
    trace = node.stack_trace or ""
    lines = trace.splitlines()
    found = ""
    for i, line in enumerate(lines):  # outermost first: the last user frame is the line that made the node
        line = line.strip()
        if line.startswith("File ") and f"{os.sep}torch{os.sep}" not in line and _HERE not in line:
            try:
                path = line.split('"')[1]
                lineno = line.split("line ")[1].split(",")[0]
            except IndexError:
                continue
            if path.startswith("<"):  # generated code (the analysis's own forward wrapper)
                continue
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found = f"{os.path.basename(path)}:{lineno} `{code}`"
    return found or f"node {node.name} ({node.target})"


def module_of(node: fx.Node) -> str:
    """` in module 'a.b'`: the innermost module whose forward made `node` ("" at the model's own forward)."""
    stack = [p for p in (node.meta.get("nn_module_stack") or {}) if p]
    return f" in module {stack[-1]!r}" if stack else ""
