"""The package's modules import without cycles (issue 12, item 18).

``test_module_graph_is_acyclic`` parses every module of dots1_ext with ``ast`` and builds the graph of
its imports of dots1_ext modules: module-level and function-level imports alike (an import deferred
into a function still ties the two modules together; that is how the cli <-> distributed cycle hid),
except those under ``if TYPE_CHECKING:``, which never run. Importing a submodule runs its parent
package's ``__init__`` first; that implicit edge is not a dependency of the module and is left out,
while an explicit import of a name defined in a package ``__init__`` is kept.
``test_each_module_imports_first_in_a_fresh_interpreter`` then imports each module as the first
dots1_ext import of a new interpreter.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dots1_ext"
EXTENSIONS = {"dots1_ext._C"}  # compiled (setup.py); a leaf: it imports no Python module of ours


def package_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module under dots1_ext/ (a package as its __init__.py)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> bool:
    return name in modules or name in EXTENSIONS


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes of ``tree`` at any depth, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported dots1_ext module: line of the first such import}}."""
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, {})
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name`, pkg itself.
                targets = [f"{base}.{a.name}" if _known(f"{base}.{a.name}", modules) else base for a in node.names]
            for target in targets:
                while target and not _known(target, modules) and "." in target:  # import a.b.c of a non-module c
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path) through each non-trivial strongly connected component."""
    index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:  # a shortest closed path from the component's first module back to itself
        members, start = set(scc), sorted(scc)[0]
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = [w for w in graph[path[-1]] if w in members]
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_module_graph_is_acyclic():
    graph = import_graph()
    assert {"dots1_ext.cli", "dots1_ext.distributed", "dots1_ext.model", "dots1_ext.ops.gating"} <= set(graph)
    assert "dots1_ext.loader" in graph["dots1_ext.distributed"]  # the parser sees function-level imports too
    cycles = find_cycles(graph)
    modules = package_modules()

    def where(a, b):
        return f"{modules[a].relative_to(ROOT)}:{graph[a][b]}"

    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(c) + "\n    " + ", ".join(f"{a} imports {b} at {where(a, b)}" for a, b in zip(c, c[1:]))
        for c in cycles)


def test_cycle_finder_finds_a_cycle():
    # The check itself can fail: a graph with the old cli <-> distributed cycle.
    graph = {"dots1_ext.cli": {"dots1_ext.distributed": 1}, "dots1_ext.distributed": {"dots1_ext.cli": 2},
             "dots1_ext.model": {}}
    assert find_cycles(graph) == [["dots1_ext.cli", "dots1_ext.distributed", "dots1_ext.cli"]]


def test_type_checking_imports_are_not_edges(tmp_path):
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dots1_ext.model import X\n"
                     "def f():\n    from dots1_ext import loader\n")
    assert sorted(n.lineno for n in _imports(tree)) == [1, 5]


def test_each_module_imports_first_in_a_fresh_interpreter():
    """One interpreter per module (run concurrently, one per core), each importing only that module."""
    from concurrent.futures import ThreadPoolExecutor

    modules = sorted(m for m in package_modules() if m != "dots1_ext.__main__")  # __main__ runs the CLI
    try:
        import transformers  # noqa: F401
    except ImportError:
        modules.remove("dots1_ext.hf")  # the HF bridge needs the optional transformers
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    def run(module):
        return module, subprocess.run([sys.executable, "-c", f"import {module}"], env=env, cwd=ROOT,
                                      capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failed = [(m, p.stderr[-2000:]) for m, p in pool.map(run, modules) if p.returncode != 0]
    assert not failed, "\n".join(f"import {m} in a fresh interpreter failed:\n{err}" for m, err in failed)


def test_design_notes_the_code_cites_are_in_the_project():
    # Code and tests cite "docs/design.md §N": the file ships with the project and has each section.
    root = Path(__file__).resolve().parent.parent
    design = (root / "docs" / "design.md").read_text()
    cited = set()
    for path in [*root.glob("dots1_ext/**/*.py"), *root.glob("tests/*.py"), *root.glob("csrc/**/*.*")]:
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path}: cites DESIGN.md, which users of the project do not have"
        cited |= set(re.findall(r"docs/design\.md §(\d+)", text))
    assert cited, "no citation found: the test would check nothing"
    for section in cited:
        assert f"\n## {section}. " in design, f"docs/design.md has no section {section}"
