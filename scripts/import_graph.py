"""Print which module of ``zo_trainer`` and ``benchmarks`` imports which (module-level and lazy imports alike, not
``TYPE_CHECKING`` ones), any import cycle, and any library module that imports a program.

    python scripts/import_graph.py [PACKAGE_DIR ...]   # default: zo_trainer/ and benchmarks/ beside this script's folder

The library (``zo_trainer`` outside ``zo_trainer.cli`` and the ``python -m`` shims) must never import a program
(``zo_trainer.cli``) or the benchmarks. Reads the sources with ``ast`` (nothing is imported). Exit status 1 if
there is a cycle or such an import, else 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from . import x`` counts x when x is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_only = {  # Imports under `if TYPE_CHECKING:` never run.
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    # "from .x import y" also names the package x is in; keep the most specific module only.
    return {m for m in found if not any(other.startswith(m + ".") for other in found)} or found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


# Programs: zo_trainer.cli and the `python -m zo_trainer.train / .run` shims over it (README); and the benchmarks.
PROGRAMS = ("zo_trainer.cli", "benchmarks")
PROGRAM_SHIMS = {"zo_trainer.train", "zo_trainer.run"}


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def library_imports_of_programs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(library module, program module) pairs: what the library must never import."""
    return [
        (name, target)
        for name in sorted(graph)
        if is_under(name, "zo_trainer") and not is_under(name, "zo_trainer.cli") and name not in PROGRAM_SHIMS
        for target in sorted(graph[name])
        if any(is_under(target, program) for program in PROGRAMS)
    ]


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parents[1]
    roots = [Path(a) for a in argv] or [here / "zo_trainer", here / "benchmarks"]
    files = {module_name(p, root): p for root in roots for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    # A package __init__ re-exports; counting "zo_trainer" as a target would make every module a cycle with it.
    packages = {root.name for root in roots}
    graph = {name: imports_of(path, name, modules) - packages for name, path in files.items()}
    for name in sorted(graph):
        print(f"{name} -> {', '.join(sorted(graph[name])) or '-'}")
    found = cycles({k: v for k, v in graph.items() if k not in packages})
    print(f"\ncycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    wrong = library_imports_of_programs(graph)
    print(f"library modules importing a program (zo_trainer.cli, benchmarks): {len(wrong)}")
    for name, target in wrong:
        print(f"  {name} -> {target}")
    return 1 if found or wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
