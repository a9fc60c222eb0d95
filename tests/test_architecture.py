"""The package's shape: no import circles (imports inside functions count too) and no module too long
to read in one sitting. Both are read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "llama3"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 450

def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module>`` means inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``module`` imports anywhere in its file (top level, functions,
    ``TYPE_CHECKING`` blocks). Importing ``a.b.c`` from outside ``a.b`` also runs ``a.b``'s
    ``__init__``, so that package counts as imported too (the top-level package excepted: it is
    the public façade, and nothing inside the package may import it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            submodules = {f"{source}.{alias.name}" for alias in node.names} & known
            # `from . import presets` imports the module llama3.presets (its package is only the
            # way there); `from .presets import PRESETS` or `from . import name` of a package
            # attribute needs the module (or package) ``source`` itself.
            targets.update(submodules)
            if len(submodules) < len(node.names):
                targets.add(source)
    found: set[str] = set()
    for target in targets:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            continue
        while target and target not in known:  # `import llama3.x.y` of an attribute y
            target = target.rpartition(".")[0]
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            if ancestor == target or not (module == ancestor or module.startswith(ancestor + ".")):
                found.add(ancestor)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "circle among " + ", ".join(component) + ": " + "; ".join(edges)


def test_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    # The checker itself, on a made-up package: a -> b at the top, b -> a inside a function.
    pkg = tmp_path / "llama3"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import g\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    from ..d import h\n")
    (pkg / "d.py").write_text("def h():\n    from .sub.c import g\n")  # runs sub/__init__ too
    # `from . import y` inside a package whose __init__ imports x: a sibling, no circle.
    (pkg / "other").mkdir()
    (pkg / "other" / "__init__.py").write_text("from .x import y\n")
    (pkg / "other" / "x.py").write_text("from . import y\n")
    (pkg / "other" / "y.py").write_text("")
    assert find_cycles(import_graph(pkg)) == [["llama3.a", "llama3.b"],
                                              ["llama3.d", "llama3.sub", "llama3.sub.c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "llama3.tokenizer" in graph
    assert "llama3.checkpoint.meta" in graph
    # The modules split out of tools.py, chat.py and generation.py are read too.
    split_out = {"llama3.tool_definitions", "llama3.tool_prompts", "llama3.tool_calls", "llama3.chat_input",
                 "llama3.loading", "llama3.predictions"}
    assert split_out <= set(graph)
    assert {"llama3.tool_calls", "llama3.tool_prompts", "llama3.tool_definitions"} <= graph["llama3.tools"]
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_nothing_inside_the_package_imports_the_facade() -> None:
    # llama3/__init__.py imports the whole public API; importing it from inside is a hidden circle.
    graph = import_graph()
    assert [m for m, targets in graph.items() if PACKAGE in targets] == []


@pytest.mark.parametrize("relpath", [str(p.relative_to(ROOT.parent)) for p in sorted(ROOT.rglob("*.py"))])
def test_module_length(relpath: str) -> None:
    lines = len((ROOT.parent / relpath).read_text().splitlines())
    assert lines <= MAX_LINES, f"{relpath} has {lines} lines; split a second concern into its own module"


def test_child_processes_import_this_checkout(tmp_path: Path) -> None:
    # A script run by a test (cwd elsewhere, its own folder first on sys.path) must get this
    # checkout's llama3, not an installed copy or nothing (conftest.py sets PYTHONPATH).
    script = tmp_path / "where.py"
    script.write_text("import llama3\nprint(llama3.__file__)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "__init__.py"


def test_checkpoint_formats_do_not_import_each_other() -> None:
    # Each format reader stands alone; what one needs from the other (the RoPE scaling of a
    # config.json beside Meta's original/ folder) is passed in by inspect_checkpoint.
    graph = import_graph()
    assert "llama3.checkpoint.hf" not in graph["llama3.checkpoint.meta"]
    assert "llama3.checkpoint.meta" not in graph["llama3.checkpoint.hf"]
