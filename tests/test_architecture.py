"""The layers as the imports show them: every module imports, `hlm`'s import graph has no cycle, only the command
line imports the command line, and the page (`app.py`) needs few names from the library."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hlm

ROOT = Path(hlm.__file__).resolve().parent.parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(hlm.__path__, "hlm."))


def module_path(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except those under `if TYPE_CHECKING:` (annotations only: never imported at run time)."""
    nodes, stack = [], [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported(tree: ast.AST, name: str = "") -> list[tuple[str, list[str]]]:
    """(module, names) of every run-time import in `tree`, top level or inside functions; relative imports resolved
    against the package of `name`."""
    found = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: -node.level] if name else []
                base = ".".join([*package, base] if base else package)
            found.append((base, [alias.name for alias in node.names]))
    return found


def hlm_edges(name: str) -> set[str]:
    """The `hlm` modules that module `name` imports (`from hlm.x import y` counts `hlm.x.y` where that is a module)."""
    tree = ast.parse(module_path(name).read_text(encoding="utf-8"))
    edges = set()
    for module, names in imported(tree, name):
        if module != "hlm" and not module.startswith("hlm."):
            continue
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        edges.update(submodules or ([module] if module in MODULES else []))
    return edges - {name}


GRAPH = {name: hlm_edges(name) for name in MODULES}


@pytest.mark.parametrize("name", [m for m in MODULES if m != "hlm.__main__"])
def test_every_module_imports(name):
    importlib.import_module(name)


def test_the_import_graph_has_no_cycle():
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in MODULES:
        visit(name, [])


def test_only_the_command_line_imports_the_command_line():
    offenders = {name: sorted(e for e in edges if e == "hlm.cli" or e.startswith("hlm.cli."))
                 for name, edges in GRAPH.items() if not (name == "hlm.cli" or name.startswith("hlm.cli."))
                 and name != "hlm.__main__"}
    assert not {name: e for name, e in offenders.items() if e}


def test_the_page_imports_at_most_five_names_from_hlm():
    tree = ast.parse((ROOT / "app.py").read_text(encoding="utf-8"))
    names = [n for module, names in imported(tree) if module == "hlm" or module.startswith("hlm.")
             for n in names or [module]]
    assert len(names) <= 5, names


def test_the_command_lines_help_does_not_load_the_models_stack():
    """`python -m hlm --help` builds every command's parser: the heavy libraries wait for a command to run."""
    code = ("import sys; from hlm.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
