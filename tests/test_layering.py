"""The package's layering, read from the source: the algorithm core is pure, no stage imports another, nothing below
the stages imports them, and the modules' imports form no cycle."""
import ast

from tests.conftest import REPO


def _imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def test_algorithms_import_nothing_of_the_pipeline():
    for path in (REPO / "rlhf" / "algorithms").glob("*.py"):
        ours = {m for m in _imports(path) if m.startswith("rlhf")}
        assert ours <= {"rlhf.errors", "rlhf.errors.ConfigError"}, (path.name, ours)


def test_no_stage_imports_another_stage():
    stages = {p.stem for p in (REPO / "rlhf" / "stages").glob("*.py")} - {"__init__", "common"}
    for path in (REPO / "rlhf").rglob("*.py"):
        imported = {m.split(".")[2] for m in _imports(path) if m.startswith("rlhf.stages.")}
        if path.parent.name == "stages":
            assert not imported & (stages - {path.stem}), (path.name, imported)
        else:  # outside the stages only the CLI names them (by string, through the registry)
            assert not imported & stages, (path.name, imported)


def test_nothing_below_the_stages_imports_them():
    """Stages are the top layer: the trainer, rewards, tables and the rest never import rlhf.stages (the CLI finds a
    stage's module by name, through the registry)."""
    for path in (REPO / "rlhf").rglob("*.py"):
        if path.parent.name != "stages":
            assert not any(m.startswith("rlhf.stages") for m in _imports(path)), path.relative_to(REPO)


def _module(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_form_no_cycle():
    """Imports between the package's modules point one way only, function-level ones included (a cycle hidden in a
    function, as rlhf/tables.py <-> rlhf/figures.py once was, is still a cycle)."""
    modules = {_module(p): p for p in (REPO / "rlhf").rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])
