"""The package's shape: imports flow one way, and model families depend on nothing else.

The import graph is read from the source (every import statement, including the ones
inside functions: a lazy import hides a cycle, it does not remove it).
"""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bluelm_quant"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, node: ast.AST) -> set[str]:
    """The bluelm_quant modules an import statement names (the most specific module that exists)."""
    is_package = MODULES[importer].name == "__init__.py"
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = importer.split(".")
        if node.level:
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
    found = set()
    for target in targets:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target.startswith("bluelm_quant"):
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= resolve(name, node)
        # A module's own package (__init__) runs first anyway: that edge is not a dependency.
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # The package __init__ imports the public API; nothing below it may import it back.
    graph.pop("bluelm_quant")
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_model_families_import_nothing_else_from_the_package():
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("bluelm_quant.models"):
            outside = sorted(e for e in edges if not e.startswith("bluelm_quant.models"))
            assert not outside, f"{name} imports {outside}"


def test_importing_the_package_registers_blueLM_and_loads_no_module_twice():
    code = (
        "import sys, bluelm_quant\n"
        "from transformers import AutoConfig\n"
        "assert type(AutoConfig.for_model('BlueLM')).__name__ == 'BlueLMConfig'\n"
        "files = [getattr(m, '__file__', None) for n, m in list(sys.modules.items()) if n.startswith('bluelm_quant')]\n"
        "files = [f for f in files if f]\n"
        "assert len(files) == len(set(files)), sorted(f for f in files if files.count(f) > 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_entry_point_in_setup_py_resolves():
    """Console scripts and the vLLM plugin name functions that exist (setup.py parsed, not run)."""
    import importlib

    tree = ast.parse((PACKAGE.parent / "setup.py").read_text(encoding="utf-8"))
    targets = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and " = bluelm_quant." in node.value]
    assert {t.split(" = ")[0] for t in targets} >= {"bluelm-quantize", "bluelm-chat", "bluelm-eval-ppl", "bluelm"}
    for target in targets:
        module, _, func = target.split(" = ")[1].partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
