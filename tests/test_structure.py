"""The server's modules import downward only: no circle, and no import hidden in a function.

A circle forces imports into functions (paid at the first request, invisible to a reader of
the module's head); tests/test_structure.py keeps the import graph of crq.server a DAG.
"""

from __future__ import annotations

import ast
from pathlib import Path

from crq.tasker.cli import _good_name

from crq.wire import valid_tasker_name

SERVER = Path(__file__).resolve().parent.parent / "server"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SERVER.rglob("*.py"):
        parts = [x for x in p.relative_to(SERVER).with_suffix("").parts if x != "__init__"]
        out[".".join(["crq.server", *parts])] = p
    return out


def _imports(tree: ast.AST, known: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out |= {n for n in names if n in known}
    return out


def test_the_server_import_graph_has_no_circle() -> None:
    mods = _modules()
    graph = {m: _imports(ast.parse(p.read_text()), mods) - {m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, f"import circle: {' -> '.join(path[path.index(m) :] + [m])}"
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_no_server_module_imports_inside_a_function() -> None:
    found = []
    for p in _modules().values():
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [
                    f"{p.name}:{n.lineno}"
                    for n in ast.walk(fn)
                    if isinstance(n, (ast.Import, ast.ImportFrom))
                ]
    assert not found


def test_one_tasker_name_rule_for_server_and_tasker() -> None:
    good = ["w1", "host.example.com", "a@b-c_d", "x" * 128, "..."]
    bad = ["", ".", "..", "x" * 129, "é", "a/b", "a b", "a\0b"]
    assert all(valid_tasker_name(n) and _good_name(n) for n in good)
    assert not any(valid_tasker_name(n) or _good_name(n) for n in bad)
