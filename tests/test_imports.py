"""The project's import graph, built with `ast` from the source (nothing is imported):
no cycle between modules, function-level imports included (a cycle hidden in a
function is still a cycle), and the layers of docs/design.md ("Layout"):
`pretrain -> model -> xlstm_kernels`, `pretrain -> data`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "model", "data", "xlstm_kernels", "slurm")
# which project packages each package may import (itself always)
ALLOWED = {"xlstm_kernels": set(), "data": set(), "model": {"xlstm_kernels"},
           "pretrain": {"model", "data", "xlstm_kernels"}, "slurm": {"pretrain"}}


def module_names() -> dict[str, Path]:
    """'pretrain.checkpoint.layout' -> its file; a package is its __init__.py."""
    out = {}
    for pkg in PACKAGES:
        for file in (ROOT / pkg).rglob("*.py"):
            parts = file.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def imports_of(name: str, file: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (`from X import y`
    counts as X.y when that is a module, else X)."""
    is_pkg = file.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a non-module tail: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    files = module_names()
    return {name: imports_of(name, file, set(files)) for name, file in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(edges):
        if start in state:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges.get(child, ())))))
    return None


def test_finds_a_cycle_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_relative_and_function_level_imports(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("from .sub import thing\ndef f():\n    from ..other import x\n    import pkg.deep.mod\n")
    known = {"pkg.a.m", "pkg.a.sub", "pkg.other", "pkg.deep.mod"}
    assert imports_of("pkg.a.m", file, known) == {"pkg.a.sub", "pkg.other", "pkg.deep.mod"}


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 40  # the project's modules were found
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_import_one_way():
    bad = sorted(f"{a} imports {b}" for a, targets in graph().items() for b in targets
                 if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert not bad, bad
