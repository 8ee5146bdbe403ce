"""The layering of docs/ARCHITECTURE.md, checked on every import of the tree so that it cannot rot.

Layers, top to bottom: entry points (``*.py`` at the top level, ``scripts/``) -> ``training/`` ->
``model/`` and ``dataset/`` side by side -> ``utils/``. Every import statement counts, wherever it is
(module level, inside a function, under ``if TYPE_CHECKING:``), and so do ``importlib.import_module("...")``
and ``__import__("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "model", "dataset", "utils")
#: Height of each room; an import must point to a strictly lower room, or stay inside its own package.
LEVEL = {"entry": 3, "training": 2, "model": 1, "dataset": 1, "utils": 0}
SKIP_DIRS = {".venv", "tests", "quickstart", "runs", "build", ".git", "docs"}


def source_files(root: Path = ROOT) -> list[Path]:
    """Every project ``.py`` file outside tests and generated folders."""
    return sorted(
        p
        for p in root.rglob("*.py")
        if not SKIP_DIRS & set(p.relative_to(root).parts) and ".egg" not in str(p)
    )


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def room_of(module: str) -> str:
    head = module.split(".")[0]
    return head if head in PACKAGES else "entry"


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in ``tree``, including ``X.Y`` candidates of
    ``from X import Y`` (resolved against the files later)."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.args[0].value, node.lineno))
    return out


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported project module, line)] over :func:`source_files`."""
    files = {module_name(p, root): p for p in source_files(root)}
    graph: dict[str, list[tuple[str, int]]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = []
        for target, line in imported_names(tree, name, path.name == "__init__.py"):
            if target in files and target != name:
                edges.append((target, line))
        graph[name] = sorted(set(edges))
    return graph


def violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """One line per import that runs upward, sideways between rooms, or between two entry points."""
    bad = []
    for src, edges in graph.items():
        a = room_of(src)
        for dst, line in edges:
            b = room_of(dst)
            if a == b and a != "entry":
                continue
            if a == "entry" and b == "entry":
                bad.append(f"{src}:{line} imports the entry point {dst} (put shared code in the library)")
            elif LEVEL[b] >= LEVEL[a]:
                bad.append(f"{src}:{line} ({a}) imports {dst} ({b}): not downward")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every import cycle (strongly connected component of more than one module, or a self-loop)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_runs_downward_and_model_and_dataset_never_meet():
    graph = import_graph()
    assert len(graph) > 40, "the walk found too few modules: is ROOT right?"
    assert violations(graph) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_utils_imports_nothing_of_ours():
    graph = import_graph()
    outside = {
        src: [e for e in edges if room_of(e[0]) != "utils"]
        for src, edges in graph.items()
        if room_of(src) == "utils"
    }
    assert {src: edges for src, edges in outside.items() if edges} == {}


def test_no_file_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in source_files() if "sys.path.insert" in p.read_text()]
    offenders += [
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py") if "sys.path.insert" in p.read_text()
    ]
    assert offenders == [str(Path("tests/test_layers.py"))]  # this file names it, to look for it


def test_the_checker_sees_lazy_type_checking_and_importlib_imports(tmp_path):
    """The walk itself: a tree with one import of each hidden kind, each breaking a rule."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "utils" / "a.py").write_text("def f():\n    from model import b\n")
    (tmp_path / "model" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dataset.c import X\n"
    )
    (tmp_path / "dataset" / "c.py").write_text(
        "import importlib\nm = importlib.import_module('training.d')\n"
    )
    (tmp_path / "training" / "d.py").write_text("from training import e\n")
    (tmp_path / "training" / "e.py").write_text("from . import d\n")
    graph = import_graph(tmp_path)
    found = violations(graph)
    assert any(line.startswith("utils.a:2") for line in found)
    assert any(line.startswith("model.b:3") and "dataset.c" in line for line in found)
    assert any(line.startswith("dataset.c:2") and "training.d" in line for line in found)
    assert cycles(graph) == [["training.d", "training.e"]]


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_long_files_say_why_at_the_top(path):
    lines = path.read_text().splitlines()
    if len(lines) > 420:
        head = "\n".join(lines[:40]).lower()
        assert "length:" in head, f"{path}: {len(lines)} lines without a 'Length:' reason at its top"
