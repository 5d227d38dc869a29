"""The layering of the tree, read from the source with ``ast``: ``agent`` may import ``catalog`` and ``backends``;
``backends`` never imports ``agent``; ``catalog`` imports neither. Every import counts here, including those
inside functions and under ``TYPE_CHECKING``: a deferred import is still a dependency."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "backends", "catalog")
FORBIDDEN = {"backends": {"agent"}, "catalog": {"agent", "backends"}}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (a submodule when ``from pkg import submodule``)
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``
    main_only: bool  # under ``if __name__ == "__main__":`` (runs as ``__main__``, never as this module)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_submodule(package: str, name: str) -> bool:
    """``from package import name`` names a module: a .py file, a package or a C extension's source."""
    base = ROOT.joinpath(*package.split("."))
    return base.joinpath(name).is_dir() or any(base.joinpath(name + ext).exists() for ext in (".py", ".c"))


def _imports(path: Path) -> list[Import]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool, main_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            t, m = type_only, main_only
            if isinstance(child, ast.If):
                test = ast.unparse(child.test)
                t = t or "TYPE_CHECKING" in test
                m = m or test.replace("'", '"') == '__name__ == "__main__"'
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, t, m) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    source = ".".join(up + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for a in child.names:
                    target = f"{source}.{a.name}" if _is_submodule(source, a.name) else source
                    found.append(Import(module, target, child.lineno, t, m))
            visit(child, t, m)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return [i for i in found if i.target.split(".")[0] in PACKAGES]


def tree_imports() -> list[Import]:
    return [i for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py")) for i in _imports(path)]


def test_the_parser_sees_imports_of_every_kind() -> None:
    """The checks below are only as good as the parser: it must find the kinds of import the tree uses."""
    found = {(i.module, i.target) for i in tree_imports()}
    assert ("agent.runtime.server", "agent.http.app") in found  # from agent.http.app import ...
    assert ("backends.walk", "backends.cpu_placement") in found  # from backends import cpu_placement
    assert ("agent.engine.usage.aggregates", "agent.engine.usage._dirread") in found  # a C extension, in a function
    assert any(i.type_only for i in tree_imports())


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in tree_imports()
        if i.target.split(".")[0] in FORBIDDEN.get(i.module.split(".")[0], set())
    ]
    assert not wrong, "catalog imports neither agent nor backends; backends never imports agent:\n" + "\n".join(
        wrong
    )


# Circles still in the tree, each as its sorted set of modules. Listed so that the test passes while they are
# undone; the list may only shrink (a circle gone from the tree must be struck from it, a new one fails).
EXPECTED_CIRCLES: list[frozenset[str]] = []


def import_circles(imports: list[Import]) -> list[frozenset[str]]:
    """Strongly connected sets of two or more modules, over the imports that run (``TYPE_CHECKING`` and
    ``__main__`` blocks do not; imports inside functions do, when the function is called)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.module, set())
        if not (i.type_only or i.main_only) and i.target != i.module:
            graph[i.module].add(i.target)
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[frozenset[str]] = []

    def connect(v: str) -> None:  # Tarjan; the tree is shallow enough for recursion
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue  # a C extension or a name the parser could not place
            if w not in order:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            members = {stack.pop()}
            while v not in members:
                members.add(stack.pop())
            if len(members) > 1:
                circles.append(frozenset(members))

    for v in sorted(graph):
        if v not in order:
            connect(v)
    return circles


def test_import_circles_only_shrink() -> None:
    found = set(import_circles(tree_imports()))
    new = [sorted(c) for c in found - set(EXPECTED_CIRCLES)]
    gone = [sorted(c) for c in set(EXPECTED_CIRCLES) - found]
    assert not new, f"new import circles: {new}"
    assert not gone, f"circles undone (strike them from EXPECTED_CIRCLES): {gone}"


def test_circle_search_finds_a_circle() -> None:
    """The search itself, on a tree with one planted circle (so an empty answer above means something)."""
    planted = [Import("agent.a", "agent.b", 1, False, False), Import("agent.b", "agent.a", 1, False, False)]
    assert frozenset({"agent.a", "agent.b"}) in import_circles(tree_imports() + planted)
    type_only = [planted[0], Import("agent.b", "agent.a", 1, True, False)]
    assert frozenset({"agent.a", "agent.b"}) not in import_circles(tree_imports() + type_only)
