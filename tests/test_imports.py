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
    assert ("agent.server", "agent.app") in found  # from agent.app import ...
    assert ("backends.walk", "backends.cpu_placement") in found  # from backends import cpu_placement
    assert ("agent.usage_engine.aggregates", "agent.usage_engine._dirread") in found  # a C extension, in a function
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
