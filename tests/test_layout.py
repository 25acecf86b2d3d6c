"""The tree shows the data path (issue 11, "Layout"), and keeps showing it.

Read from the source, not imported: the rules are about what the files say. A unit is a
top-level module of ``proxy/`` or one of its packages; imports between units must go one
way (no cycle), the product never imports ``bench/`` or ``tests/``, every error a client
can get is in ``errors.py``, and every config section's type lives in ``config/``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PROXY = Path(__file__).resolve().parents[1] / "proxy"


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PROXY.rglob("*.py")):
        yield str(path.relative_to(PROXY)), ast.parse(path.read_text(encoding="utf-8"))


def imported(tree: ast.Module) -> Iterator[str]:
    """Every module name an ``import`` or ``from ... import`` names, ``from proxy import
    x`` as ``proxy.x``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            if node.module == "proxy":
                yield from (f"proxy.{alias.name}" for alias in node.names)


def unit_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "proxy" or len(parts) < 2 or parts[1] == "__version__":
        return None
    return parts[1].removesuffix(".py")


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for rel, tree in modules():
        unit = rel.split("/")[0].removesuffix(".py")
        for name in imported(tree):
            target = unit_of(name)
            if target is not None and target != unit:
                graph.setdefault(unit, set()).add(target)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (depth-first, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_imports_between_units_go_one_way() -> None:
    graph = unit_graph()
    assert {"core", "handlers", "dispatch", "upstream"} <= graph.keys()
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None


def test_the_product_imports_neither_bench_nor_tests() -> None:
    offenders = [(rel, name) for rel, tree in modules() for name in imported(tree)
                 if name.split(".")[0] in ("bench", "tests")]
    assert offenders == []


def test_every_gateway_error_is_in_errors_py() -> None:
    """STYLE.md point 6: one error tree, drawn in errors.py's docstring."""
    errors = {rel: tree for rel, tree in modules()}["errors.py"]
    tree_names = {node.name for node in errors.body if isinstance(node, ast.ClassDef)}
    outside = []
    for rel, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and rel != "errors.py":
                bases = {getattr(base, "id", getattr(base, "attr", "")) for base in node.bases}
                if bases & tree_names:
                    outside.append(f"{rel}: {node.name}")
    assert outside == []
    doc = ast.get_docstring(errors) or ""
    undrawn = sorted(name for name in tree_names if name not in doc)
    assert undrawn == [], "errors.py's docstring draws the whole tree"


def test_config_sections_live_in_config() -> None:
    """Every ``parse_*(raw, ..., problems)`` section parser is in ``config/``."""
    outside = [f"{rel}: {node.name}" for rel, tree in modules() for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("parse_")
               and any(arg.arg == "problems" for arg in node.args.args)
               and not rel.startswith("config/")]
    assert outside == []
