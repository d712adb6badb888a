"""The package's layering, read from the source: the algorithm core is pure, and no stage imports another."""
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
