"""The package layout is the architecture: cats_ds's import graph has no cycle and runs
downward through the layers below.

The graph is read from the source with ast: every `import cats_ds...` and `from cats_ds...
import` at module level AND inside functions (an import inside a function still runs, it
only runs later; it cannot hide a cycle here). Imports under `if TYPE_CHECKING:` never run
and only name types (e.g. training.loop's Run in analysis/ and training/checkpoint.py), so
they are left out. Importing cats_ds.a.b from outside cats_ds.a also runs cats_ds/a/__init__.py:
that implicit edge counts for cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1] / "cats_ds"

LAYERS = [
    ("runtime", ["cats_ds.runtime"]),
    ("languages", ["cats_ds.data.langcodes", "cats_ds.data.groups"]),
    ("config", ["cats_ds.config"]),
    ("data, model", ["cats_ds.data", "cats_ds.model"]),
    ("checkpoint format, weighting", ["cats_ds.checkpoints", "cats_ds.weighting"]),
    ("losses, gradients", ["cats_ds.training.losses", "cats_ds.training.grads"]),
    ("inference", ["cats_ds.inference"]),
    ("analysis", ["cats_ds.analysis"]),
    ("training", ["cats_ds.training"]),
    ("reports", ["cats_ds.reports"]),
    ("entry points", ["cats_ds.bench", "cats_ds.cli"]),
]
"""Bottom to top: a module may import its own layer and the layers below it, never above.
A module belongs to the layer of its longest matching prefix (cats_ds.data.groups is in
"languages", the rest of cats_ds.data in "data, model"; training/losses.py and grads.py sit
below inference and analysis, which use them; the rest of training/ above both)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if p.name != "__main__.py"}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path, known: dict) -> list[tuple[str, int, str]]:
    """(imported cats_ds module, line, 'top-level' | 'in a function') of one module, TYPE_CHECKING blocks left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def target(mod: str, attr: Optional[str]) -> str:
        if attr and f"{mod}.{attr}" in known:  # `from cats_ds.runtime import preempt`: the module
            return f"{mod}.{attr}"
        return mod

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            here = "in a function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, here) for a in child.names if a.name.startswith("cats_ds"))
            elif isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([mod] if mod else []))
                if mod.startswith("cats_ds"):
                    found.extend((target(mod, a.name), child.lineno, here) for a in child.names)
            visit(child, here)

    visit(ast.parse(path.read_text(encoding="utf-8")), "top-level")
    return found


def graph() -> dict[str, list[tuple[str, int, str]]]:
    """module -> [(imported module, line, where)], with the implicit package __init__ edges."""
    known = modules()
    edges = {}
    for name, path in known.items():
        out = []
        for target, line, where in imports(name, path, known):
            assert target in known, f"{path}:{line}: imports {target}, which is not a module of cats_ds"
            parts = target.split(".")
            for i in range(2, len(parts)):  # cats_ds.a.b from outside cats_ds.a runs cats_ds/a/__init__.py
                package = ".".join(parts[:i])
                if not (name == package or name.startswith(package + ".")):
                    out.append((package, line, f"{where}, via {target}"))
            out.append((target, line, where))
        edges[name] = [e for e in out if e[0] != name and e[0] != "cats_ds"]
    return edges


def layer_of(name: str) -> Optional[int]:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def describe(chain: list[tuple[str, str, int, str]]) -> str:
    return "\n".join(f"  {a} -> {b}  ({modules()[a].relative_to(ROOT.parent)}:{line}, {where})"
                     for a, b, line, where in chain)


def find_cycle(edges: dict) -> Optional[list]:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list = []

    def dfs(node: str) -> Optional[list]:
        state[node] = 1
        for target, line, where in edges.get(node, []):
            stack.append((node, target, line, where))
            if state.get(target) == 1:
                start = next(i for i, e in enumerate(stack) if e[0] == target)
                return stack[start:]
            if target not in state:
                found = dfs(target)
                if found:
                    return found
            stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle:\n" + describe(cycle)


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "cats_ds" and layer_of(m) is None]
    assert not missing, f"modules in no layer of tests/test_layout.py LAYERS: {missing}"


def test_imports_run_downward():
    bad = []
    for name, out in graph().items():
        mine = layer_of(name)
        for target, line, where in out:
            if "via" in where:  # the implicit package edges count for cycles only
                continue
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append((name, target, line, f"{where}: layer '{LAYERS[mine][0]}' imports '{LAYERS[theirs][0]}'"))
    assert not bad, "imports that go up a layer:\n" + describe(bad)


def _importers(prefixes: tuple[str, ...], allowed: tuple[str, ...]) -> list:
    found = []
    for name, out in graph().items():
        if name.startswith(allowed) or name in allowed:
            continue
        found += [(name, t, line, where) for t, line, where in out
                  if "via" not in where and (t in prefixes or t.startswith(tuple(p + "." for p in prefixes)))]
    return found


def test_checkpoint_format_imports_nothing_of_training_or_its_users():
    bad = [(n, t, line, w) for n, out in graph().items() if n == "cats_ds.checkpoints"
           for t, line, w in out if t.startswith(("cats_ds.training", "cats_ds.inference", "cats_ds.analysis",
                                                    "cats_ds.reports", "cats_ds.bench", "cats_ds.cli"))]
    assert not bad, "cats_ds/checkpoints.py (the folder format) imports:\n" + describe(bad)


def test_inference_and_reports_do_not_import_training():
    bad = [(n, t, line, w) for n, out in graph().items() if n.startswith(("cats_ds.inference", "cats_ds.reports"))
           for t, line, w in out if t.startswith("cats_ds.training") and "via" not in w]
    assert not bad, "inference/ or reports/ import training/:\n" + describe(bad)


def test_only_cli_and_bench_import_bench_and_nothing_imports_cli():
    bad = _importers(("cats_ds.bench",), ("cats_ds.bench", "cats_ds.cli"))
    bad += _importers(("cats_ds.cli",), ())
    assert not bad, "bench/ or cli.py imported from elsewhere:\n" + describe(bad)


def test_the_graph_sees_function_level_imports():
    """The reader is not blind: the lazy import of DeepSpeed-heavy model.experts in
    model/build.py and a TYPE_CHECKING-only import are told apart."""
    g = graph()
    assert ("cats_ds.model.experts", "in a function") in {(t, w) for t, _, w in g["cats_ds.model.build"]}
    assert "cats_ds.training.loop" not in {t for t, _, _ in g["cats_ds.training.checkpoint"]}
    assert find_cycle({"a": [("b", 1, "top-level")], "b": [("a", 2, "in a function")]}) is not None
