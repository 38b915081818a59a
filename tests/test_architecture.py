"""The package's floors stack: rewriter > patterns > options, runtime > backends > fx, masks. Nothing imports
upward, no import hides inside a function, and the pattern registry is consistent."""

import ast
import pathlib

import networkx as nx
import pytest

import attnfx
from attnfx.patterns import NAMES, ORDER
from attnfx.patterns.base import Pattern, order

ROOT = pathlib.Path(attnfx.__file__).parent
# a module's floor: it may import its own floor and those below, never above
FLOORS = {"fx": 0, "masks": 0, "_version": 0, "backends": 1, "runtime": 2, "options": 2, "patterns": 3,
          "rewriter": 4, "__init__": 5, "__main__": 5}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("attnfx",) + tuple(p for p in parts if p != "__init__"))
        yield name, parts[0], ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module, package: str):
    """(module imported, line, at module level?) for every import of attnfx in a module's source."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnfx"):
            yield node.module, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnfx"):
                    yield alias.name, node.lineno, id(node) in top


def _floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_goes_up_a_floor_or_hides_in_a_function():
    problems = []
    for name, first, tree in _modules():
        for imported, line, at_top in _imports(tree, first):
            if not at_top:
                problems.append(f"{name}:{line} imports {imported} inside a function or block")
            if imported == "attnfx" and first != "__main__":
                problems.append(f"{name}:{line} imports the package root")
            if FLOORS[_floor_of(imported)] > FLOORS[first]:
                problems.append(f"{name}:{line} imports {imported}, a floor above it")
    assert not problems, "\n".join(problems)


def test_the_package_import_graph_has_no_cycle():
    graph = nx.DiGraph()
    for name, first, tree in _modules():
        for imported, _, _ in _imports(tree, first):
            a, b = first, _floor_of(imported)
            if a != b:
                graph.add_edge(a, b)
    assert list(nx.simple_cycles(graph)) == []


def test_every_pattern_module_declares_the_protocol_and_reads_as_a_proof():
    assert [p.name for p in ORDER] == list(NAMES)
    for p in ORDER:
        module = __import__(p.rewrite.__module__, fromlist=["PATTERN"])
        assert module.PATTERN is p
        doc = module.__doc__ or ""
        for part in ("What it matches", "Why the rewrite is exact", "When it refuses"):
            assert part in doc, f"{module.__name__}: docstring lacks '{part}'"


def test_order_follows_after_and_before_and_rejects_contradictions():
    noop = lambda site, ctx: None  # noqa: E731
    a, b = Pattern("a", noop, after=("b",)), Pattern("b", noop)
    assert [p.name for p in order([a, b])] == ["b", "a"]
    assert [p.name for p in order([Pattern("a", noop), Pattern("b", noop, before=("a",))])] == ["b", "a"]
    with pytest.raises(ValueError, match="contradict"):
        order([Pattern("a", noop, after=("b",)), Pattern("b", noop, after=("a",))])
    with pytest.raises(ValueError, match="unknown pattern"):
        order([Pattern("a", noop, after=("nope",))])
