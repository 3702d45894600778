"""The layers as the imports show them: every module imports, `hlm`'s import graph has no cycle, only the command
line imports the command line, and the page (`app.py`) needs few names from the library. And the code as a reader
meets it: no function longer than a screen, and no policy chosen by its name outside the registry."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hlm
from hlm.policies import REGISTRY

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
            "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


SOURCES = [ROOT / "app.py", *sorted((ROOT / "hlm").rglob("*.py"))]
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in SOURCES for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long


def policy_names_used_to_dispatch(tree: ast.AST) -> list[tuple[int, str]]:
    """Places that pick behaviour by a policy's name: a name compared (==, !=, in; alone or in a literal tuple, list
    or set), passed as `name=`, a key of a dict literal looked up at once, or listed in a literal tuple, list or set
    of two or more names. The registry's roles and flags say all of that (`hlm.policies`)."""
    def names(node: ast.AST | None) -> list[str]:
        if isinstance(node, ast.Constant) and node.value in REGISTRY:
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [n for e in node.elts for n in names(e)]
        return []

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            hits = [n for side in [node.left, *node.comparators] for n in names(side)]
        elif isinstance(node, ast.keyword) and node.arg == "name":
            hits = names(node.value)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):  # {"ours": ...}[name]
            hits = [n for key in node.value.keys for n in names(key)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Dict):  # {"ours": ...}.get(name)
            hits = [n for key in node.value.keys for n in names(key)]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hits = names(node) if len(names(node)) > 1 else []
        else:
            hits = []
        found += [(node.lineno, n) for n in hits]
    return found


def test_no_policy_is_chosen_by_its_name_outside_the_registry():
    found = [f"{path.relative_to(ROOT)}:{line} {name!r}" for path in SOURCES if path.name != "policies.py"
             for line, name in policy_names_used_to_dispatch(ast.parse(path.read_text(encoding="utf-8")))]
    assert found == []


def test_the_name_count_can_fail():
    tree = ast.parse('if p.name == "ours" or name in ("hlm", "slm"):\n    f(name="llm", s={"uhlm": 1}[name])')
    assert sorted(n for _, n in policy_names_used_to_dispatch(tree)) == ["hlm", "hlm", "llm", "ours", "slm", "slm",
                                                                          "uhlm"]
