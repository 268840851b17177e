"""The code's shape, checked: a torch-free runtime, no import cycles, small functions and modules.

These rules keep each stage readable by the next person who must extend it; they are cheap to
check from the source (ast), so a change that breaks one fails here, with the place named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgetl"
TRAINING_ONLY = ("torch", "torchvision", "timm", "nncf")
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 7  # self and cls not counted
MAX_MODULE_LINES = 400


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name, parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(module: str, tree: ast.Module) -> set[str]:
    """Every module `module` imports, at any depth (an import inside a function counts too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against the importing package
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_device_runtime_imports_no_training_package() -> None:
    offenders = [
        (name, other)
        for name, tree in modules().items()
        if name.startswith("edgetl.runtime")
        for other in imported(name, tree)
        if other.split(".")[0] in TRAINING_ONLY
    ]
    assert not offenders, f"edgetl/runtime must run without torch: {offenders}"


def test_no_import_cycles() -> None:
    trees = modules()
    graph = {
        name: {other for other in imported(name, tree) if other in trees and other != name}
        for name, tree in trees.items()
    }
    # a package's __init__ importing its own submodules is not a cycle of ideas
    graph = {name: {o for o in targets if not o.startswith(name + ".")} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    return [
        (f"{name}:{node.lineno} {node.name}", node)
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
    return count - bool(args.args and args.args[0].arg in ("self", "cls"))


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_functions_are_short(limit: int) -> None:
    long = [
        (where, node.end_lineno - node.lineno + 1)
        for where, node in functions()
        if node.end_lineno - node.lineno + 1 > limit
    ]
    assert not long, f"functions over {limit} lines: {long}"


def test_functions_take_few_parameters() -> None:
    many = [(where, parameters(node)) for where, node in functions() if parameters(node) > MAX_PARAMETERS]
    assert not many, f"functions with more than {MAX_PARAMETERS} parameters: {many}"


def test_modules_are_small() -> None:
    large = [
        (str(path), n) for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not large, f"modules over {MAX_MODULE_LINES} lines: {large}"
