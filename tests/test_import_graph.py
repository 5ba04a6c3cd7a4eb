"""No import cycles among the modules of cli/, node/, protocol/ and consensus/.

Every import counts, at module level or inside a function (a function-level import hides a cycle, it does not
remove it). `flnode.X.Y` maps to the directory X/Y (the setuptools package-dir in pyproject.toml). An import of a
submodule is an edge to that module only, not to its parent packages' __init__: re-exporting from a package
__init__ is not a cycle. Imports under `if TYPE_CHECKING:` never run and are left out. Run as a script to print
every cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "node", "protocol", "consensus")

# Known cycles: none. Add an entry only with a reason; a new cycle fails the test.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["flnode", *parts])] = path
    return out


def _imported(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool) -> Iterator[str]:
    """Absolute names an import statement in module `name` may load (filtered to our modules by the caller)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    yield target
    for alias in node.names:
        yield f"{target}.{alias.name}"  # `from pkg import submodule`


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            names = list(_imported(node, mod, is_pkg))
            if isinstance(node, ast.ImportFrom):
                # `from pkg import sub` loads pkg.sub; `from pkg import name` loads pkg only.
                target, subs = names[0], [n for n in names[1:] if n in files]
                names = subs if subs and all(f"{target}.{a.name}" in files for a in node.names) else [target, *subs]
            graph[mod].update(n for n in names if n in files and n != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each starting at its smallest module (no duplicates)."""
    found: list[list[str]] = []

    def walk(start: str, node: str, path: list[str], on_path: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in on_path:
                on_path.add(nxt)
                walk(start, nxt, [*path, nxt], on_path)
                on_path.discard(nxt)

    for start in sorted(graph):
        walk(start, start, [start], {start})
    return found


def test_no_import_cycles() -> None:
    found = [c for c in cycles(import_graph()) if tuple(c) not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


if __name__ == "__main__":
    found = cycles(import_graph())
    for c in found:
        print(" -> ".join(c))
    print(f"{len(found)} cycle(s)")
    sys.exit(1 if found else 0)
