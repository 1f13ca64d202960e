#!/usr/bin/env python3
"""Fail on an import circle or a layering breach inside the `apix_trio` package.

Every import counts, wherever it stands: at module level, under
`if TYPE_CHECKING:` and inside functions. A deferred import still ties two
modules together; hiding one in a function only hides the circle.

Two rules, both printed with the offending modules when broken:

1. No circles between modules: the module graph has no strongly connected
   component of more than one module (nor a module importing itself).
2. Layers: a module may import modules of its own package, and of packages in
   *lower* layers (`LAYERS` below, top first); never a higher layer, and never
   another package of its own layer. So lower layers never call up except
   through an interface (a `typing.Protocol` or a callable) they define
   themselves, and the package graph is acyclic too.

Usage: `python3 scripts/check_imports.py [PACKAGE_DIR]` (default: the
repository's `apix_trio/`). Exit status 0 when clean, 1 with a report when
not. `tests/test_import_layers.py` runs it on the real package and on small
packages made to break each rule.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

LAYERS: Sequence[Sequence[str]] = (
    # top: entry points
    ("__main__",),
    ("cli",),
    # the node's nursery tree; the configuration loader; old client import paths
    ("server", "config", "client", "reconnect"),
    # the HTTP API; the Python clients (which share only maths with the server);
    # the supervisor of worker processes
    ("http", "clients", "supervisor"),
    # op handlers: one module per family of ops
    ("commands",),
    # WebSocket gateway: handshake, connection tasks, outbox, registry, hub
    ("gateway",),
    # delivery guarantees: consumer groups, retry timers, sessions
    ("delivery",),
    # local fan-out: router, subscriptions and the replay seam, namespaces
    ("routing",),
    # storage and cross-node fan-out: interfaces, memory and Redis
    ("broker",),
    # browser pages and assets, the development token helper (apix_trio/web/pages.py)
    ("web",),
    ("auth",),
    ("observability",),
    # bottom: sans-IO protocol, settings model, the package root
    ("protocol", "settings", ""),
)
"""Packages (or top-level modules) of `apix_trio`, top layer first."""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of `known` that `tree` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_closest(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in known else _closest(base, known))
    found.discard("")
    found.discard(module)  # `from . import x` inside a package __init__ names itself
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    drop = node.level - 1 if is_package else node.level
    base = parts[: len(parts) - drop] if drop else parts
    return ".".join([*base, node.module] if node.module else base)


def _closest(name: str, known: set[str]) -> str:
    """`name` or its nearest enclosing module that is part of the package."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def load_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(root, path): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = imports_of(tree, name, path.name == "__init__.py", known)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for target in edges:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_of(module: str, root_name: str, layers: Sequence[Sequence[str]]) -> tuple[int, str]:
    """(layer index, top-level part) of a module of the package."""
    rest = module[len(root_name) + 1 :] if module != root_name else ""
    top = rest.split(".", 1)[0]
    for number, members in enumerate(layers):
        if top in members:
            return number, top
    raise LookupError(f"{module}: its package {top!r} has no layer in LAYERS")


def breaches(
    graph: dict[str, set[str]], root_name: str, layers: Sequence[Sequence[str]]
) -> Iterable[str]:
    for module in sorted(graph):
        try:
            layer, top = layer_of(module, root_name, layers)
        except LookupError as exc:
            yield str(exc)
            continue
        for target in sorted(graph[module]):
            target_layer, target_top = layer_of(target, root_name, layers)
            if target_top == top or target_layer > layer:
                continue
            where = "a higher" if target_layer < layer else "a sibling in the same"
            yield f"{module} imports {target}: {where} layer"


def check(root: Path, layers: Sequence[Sequence[str]] = LAYERS) -> list[str]:
    """Every problem found in the package at `root`, as report lines."""
    graph = load_graph(root)
    problems = [f"import circle: {' <-> '.join(component)}" for component in circles(graph)]
    problems.extend(breaches(graph, root.name, layers))
    return problems


def main(argv: Sequence[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "apix_trio"
    problems = check(root.resolve())
    for line in problems:
        print(line)
    if problems:
        print(f"check_imports: {len(problems)} problem(s) in {root}")
        return 1
    print(f"check_imports: {root.name}: no import circles, layers respected")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
