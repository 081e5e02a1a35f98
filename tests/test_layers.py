"""The packages are layers and every import points down: a deployment copies ``runtime``
alone, and each layer can be read without the ones above it.

Read from the source with ``ast`` (nothing is imported), so an import inside a function
counts as much as one at the top of a module.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# bottom to top; a package may import those below it, never one above it or beside it
LAYERS = ["runtime", "search_space", ("cost_model", "measure"), "records", "export", "autotune"]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in (layer if isinstance(layer, tuple) else (layer,))}
PACKAGES = sorted(LEVEL)

# beyond itself and the standard library, what the runtime (loaded into other people's
# processes) may import: numpy, pycuda for CUDA libraries, safetensors to read weights
RUNTIME_MAY_IMPORT = {"numpy", "pycuda", "safetensors"} | set(sys.stdlib_module_names)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in walk_running_code(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
                # ``from . import x`` may name submodules: count each as imported
                found += [(f"{prefix}.{a.name}" if not node.module else prefix, node.lineno) for a in node.names]
            else:
                found.append((node.module or "", node.lineno))
    return found


def walk_running_code(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for type hints only,
    which never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = project_modules()


def resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or a name inside one), else None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for module, path in MODULES.items():
        here = module.split(".")[0]
        for name, line in imports_of(path):
            top = name.split(".")[0]
            if top in LEVEL and top != here and LEVEL[top] >= LEVEL[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({here} may not import {top})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_runtime_imports_only_numpy_ctypes_pycuda_and_itself():
    wrong = []
    for module, path in MODULES.items():
        if not module.startswith("runtime"):
            continue
        for name, line in imports_of(path):
            top = name.split(".")[0]
            if top != "runtime" and top not in RUNTIME_MAY_IMPORT:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_search_space_imports_of_the_project_only_the_runtime():
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {name}" for m, p in MODULES.items() if m.startswith("search_space")
             for name, line in imports_of(p) if name.split(".")[0] in LEVEL and name.split(".")[0] not in
             ("search_space", "runtime")]
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = {resolve(name) for name, _ in imports_of(path)}
        # a package's own __init__ is imported on the way to any of its modules: not an edge
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def test_no_circle_between_packages_or_modules():
    packages = {a.split(".")[0]: set() for a in MODULES}
    for module, targets in module_graph().items():
        packages[module.split(".")[0]] |= {t.split(".")[0] for t in targets} - {module.split(".")[0]}
    assert find_cycle(packages) is None, f"packages import each other: {' -> '.join(find_cycle(packages))}"
    cycle = find_cycle(module_graph())
    assert cycle is None, f"modules import each other: {' -> '.join(cycle)}"


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert (find_cycle(graph) is not None) == cycle


def test_the_click_group_imports_none_of_its_commands():
    group = {t for name, _ in imports_of(MODULES["autotune.cli.group"]) if (t := resolve(name))}
    assert not any(t.startswith("autotune.cli.") for t in group), group


def test_importing_all_of_the_runtime_pulls_in_none_of_the_tuning_stack():
    import subprocess

    modules = sorted(m for m in MODULES if m.startswith("runtime."))
    code = ("import sys, importlib\nfrom runtime import *\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "heavy = ('xgboost', 'optuna', 'mlflow', 'llvmlite', 'pandas', 'search_space', 'measure', 'records',"
            " 'cost_model', 'export', 'autotune')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
