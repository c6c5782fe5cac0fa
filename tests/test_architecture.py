"""The package's shape (ARCHITECTURE.md): imports run one way, no cycles, small modules and functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "alpaca_cot")
MAX_MODULE_LINES = 350  # ARCHITECTURE.md: a module near 400 lines is asking to be split
MAX_FUNCTION_LINES = 80
# The package had 6,062 lines before the one-home-per-stage layout (issue 19). The layout itself added about 30;
# what came with it: 129 lines of CoT phrasings moved in from the data/ tool, and about 520 of new features
# (--columns with Parquet/CSV, --config, preference records, output ownership and the full-disk rules, the
# decoder's error recovery): 6,750. Then the preference stage (issue 23: data/pairs 107, training/preference 255,
# evaluation/preference 209, its flags and wiring about 90), adapter-only gathers on sharded saves and the --fsdp
# words (issue 20/21: about 75), the GPU path's fixes (about 20) and streamed stop-string cutting with the
# serving GC freeze (about 30): 7,550. A split or a move must not raise this; only a new feature may, saying so here.
MAX_PACKAGE_LINES = 7550


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[dotted] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package modules (and top-level packages) that ``path`` imports anywhere, lazy imports included."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from alpaca_cot.data import sources` imports the module alpaca_cot.data.sources
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            names.update(subs & modules.keys() or {node.module})
    return names


def test_no_import_of_the_collection_tool_and_no_cycles() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(path, modules) if m in modules and m != name} for name, path in modules.items()}
    upward = {name: sorted(m for m in _imports(path, modules) if m == "data" or m.startswith("data."))
              for name, path in modules.items()}
    assert not {k: v for k, v in upward.items() if v}, "the package must never import the top-level data/ tool"

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [name, dep]))
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_modules_and_functions_stay_small() -> None:
    big_modules, big_functions, total = [], [], 0
    for name, path in sorted(_modules().items()):
        source = open(path, encoding="utf-8").read()
        lines = source.count("\n")
        total += lines
        if lines > MAX_MODULE_LINES:
            big_modules.append(f"{name}: {lines}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big_functions.append(f"{name}.{node.name}: {length}")
    assert not big_modules, f"modules over {MAX_MODULE_LINES} lines: {big_modules}"
    assert not big_functions, f"functions over {MAX_FUNCTION_LINES} lines: {big_functions}"
    assert total <= MAX_PACKAGE_LINES, f"the package grew to {total} lines (at most {MAX_PACKAGE_LINES})"


def test_every_module_imports_without_the_collection_tool() -> None:
    """Imported from another working directory with ``data`` unimportable, every module still loads."""
    names = sorted(_modules())
    code = ("import sys; sys.modules['data'] = None; import importlib\n"
            f"for name in {names!r}: importlib.import_module(name)\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(ROOT), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
