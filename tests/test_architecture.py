"""The package's dependencies point downward (docs/engine.md, "Module map"): read from the
source with ``ast``, every import of every module, those inside functions included (a lazy
import is still a dependency; only ``if TYPE_CHECKING:`` blocks are left out).

- the runner never imports the scheduler (the step's data types live in ``engine/step.py``);
- neither config module imports the runner (nor, so, torch's model code);
- the step's data types import neither the scheduler nor the runner;
- the scheduler does not detokenize (the output processor does);
- no import cycle exists among the modules of ``itt_runtime``, ``server`` or ``loadtest``;
- docs/engine.md's module map names every module of ``itt_runtime``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("itt_runtime", "server", "loadtest")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``
    when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if _type_checking_only(node)
               for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_runner_does_not_import_the_scheduler(graph):
    for name, deps in graph.items():
        if name.startswith("itt_runtime.runner."):
            assert "itt_runtime.engine.scheduler" not in deps, name


@pytest.mark.parametrize("config", ["itt_runtime.config", "itt_runtime.engine.config"])
def test_configs_do_not_reach_the_runner(graph, config):
    assert not {m for m in reachable(graph, config) if m.startswith("itt_runtime.runner")}


def test_the_step_types_import_neither_side(graph):
    deps = reachable(graph, "itt_runtime.engine.step")
    assert not {m for m in deps if m.startswith("itt_runtime.runner")}
    assert "itt_runtime.engine.scheduler" not in deps


def test_the_scheduler_does_not_detokenize(graph):
    """Text is the output processor's: the scheduler neither reaches it nor imports a
    tokenizer (the grammar engine it advances does, to compile grammars)."""
    assert "itt_runtime.engine.output_processor" not in reachable(graph,
                                                                  "itt_runtime.engine.scheduler")
    for name in ("itt_runtime.engine.scheduler", "itt_runtime.engine.stopping"):
        assert not {m for m in graph[name] if m.startswith("itt_runtime.tokenizers")}, name


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any with more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_module_map_names_every_module():
    """Each module of itt_runtime appears in docs/engine.md's map, under its folder."""
    text = (REPO / "docs" / "engine.md").read_text()
    block = text[text.index("## Module map"):]
    block = block[block.index("```"):block.index("```", block.index("```") + 3)]
    listed, folder = set(), ""
    for line in block.splitlines()[2:]:
        name = line.split()[0] if line.strip() else ""
        if name.endswith("/"):
            folder = name if line.startswith("  ") and not line.startswith("    ") else folder
            continue
        if name.endswith(".py"):
            listed.add((folder if line.startswith("    ") else "") + name)
    modules = {str(p.relative_to(REPO / "itt_runtime"))
               for p in (REPO / "itt_runtime").rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), "modules missing from docs/engine.md's map"
    assert listed - modules == set(), "docs/engine.md's map names modules that do not exist"
