"""Size bounds and import cycles of the ``iai_queue`` package, read from the source with ``ast``.

Reports every module over ``--module-lines`` (default 400) lines, every class
over ``--class-lines`` (default 250) lines, and every cycle in the graph of
imports between the package's own modules (function-local imports included:
a cycle through one is still a knot, even when Python tolerates it at import
time). Exit status 1 when anything is reported, 0 when nothing is.

Usage: ``python scripts/check_sizes.py [--root iai_queue] [--module-lines N] [--class-lines N]``
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module named by ``from <level dots><target> import …`` inside ``current``."""
    if level == 0:
        return target or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(tree: ast.AST, current: str, is_package: bool, modules: set[str]) -> set[str]:
    """Package modules ``current`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest known module prefix of ``name``: ``a.b.func`` imports ``a.b``
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != current:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(current, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent / "iai_queue")
    parser.add_argument("--module-lines", type=int, default=400)
    parser.add_argument("--class-lines", type=int, default=250)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files = sorted(root.rglob("*.py"))
    names = {module_name(f, root): f for f in files}
    modules = set(names)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        rel = path.relative_to(root.parent)
        if lines > args.module_lines:
            problems.append(f"module {rel}: {lines} lines (> {args.module_lines})")
        tree = ast.parse(text, filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                size = node.end_lineno - first + 1
                if size > args.class_lines:
                    problems.append(f"class {rel}:{node.lineno} {node.name}: {size} lines (> {args.class_lines})")
        graph[name] = imports_of(tree, name, path.name == "__init__.py", modules)
    # A package's ``__init__`` importing its own submodules is how packages work: only explicit
    # imports are edges, so a cycle here is a real knot between modules.
    for component in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(component))
    for line in problems:
        print(line)
    if not problems:
        print(f"ok: {len(files)} modules, none over {args.module_lines} lines, no class over "
              f"{args.class_lines} lines, no import cycle")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
