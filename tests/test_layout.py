"""The house's layout promises (issue 22), checked on the source so they do not erode unnoticed: no module under
src/ is over 600 lines, and outside `analysis/` (the rule registry) and `models/` no code tests a layer's type."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "firefly_descent"
MAX_LINES = 600
OWNERS = ("analysis", "models")  # the registry's rules and the model zoo may name layer types
CONTAINERS = ("Module", "Parameter", "ModuleList", "Sequential", "DataParallel")  # not layers


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by job: {long}"


def _layer_types(node: ast.AST) -> list[str]:
    """Names like `nn.Conv2d` in an isinstance() type argument."""
    out = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "nn":
            if sub.attr[:1].isupper() and sub.attr not in CONTAINERS:
                out.append(f"nn.{sub.attr}")
    return out


def test_only_the_registry_tests_layer_types():
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                found += [f"{rel}:{node.lineno} {t}" for t in _layer_types(node.args[1])]
    assert found == [], "ask the layer's rule (analysis.rules) instead: " + "; ".join(found)


def test_the_check_sees_a_layer_type_test():
    """The scan is not vacuous: it finds the pattern it forbids."""
    tree = ast.parse("isinstance(m, (nn.Conv2d, nn.Module))")
    call = tree.body[0].value
    assert _layer_types(call.args[1]) == ["nn.Conv2d"]
