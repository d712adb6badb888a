"""The package's layering, read from the source: the algorithm core is pure, no stage imports another, nothing below
the stages imports them, and the modules' imports form no cycle."""
import ast
from pathlib import Path

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


def _function_level_imports(path) -> list[int]:
    """Line numbers of the import statements inside functions."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines += [sub.lineno for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
    return sorted(set(lines))


def test_function_level_imports_say_why():
    """An import inside a function (heavy: torch, transformers, datasets, matplotlib, vLLM, DeepSpeed; or optional)
    carries its reason: a comment on it or on the line above its block of imports, or one `# Function-level imports:`
    note for the whole module. Anything else belongs at the top, where the import graph (and the cycle test above)
    sees it."""
    unexplained = []
    for path in sorted((REPO / "rlhf").rglob("*.py")):
        text = path.read_text()
        if "# Function-level imports:" in text:
            continue
        src = text.split("\n")
        for lineno in _function_level_imports(path):
            i = lineno - 1
            if "#" in src[i]:
                continue
            j = i - 1
            while j >= 0 and src[j].strip().startswith(("import ", "from ")) and "#" not in src[j] or \
                    j >= 0 and not src[j].strip():
                j -= 1
            if j >= 0 and src[j].strip().startswith("#") or j >= 0 and "#" in src[j] and \
                    src[j].strip().startswith(("import ", "from ")):
                continue
            unexplained.append(f"{path.relative_to(REPO)}:{lineno}: {src[i].strip()}")
    assert not unexplained, "\n".join(unexplained)


def test_readme_fits_a_screen_links_every_docs_page_and_nothing_outside():
    """README stays an overview (≤ 250 lines) whose table reaches every page of docs/, and no link in the
    repository's documentation points outside it (the papers and public sources are cited, never a sibling folder)."""
    import re
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = {p.name for p in (REPO / "docs").iterdir() if p.suffix in (".md", ".svg", ".png")}
    linked = set(re.findall(r"\(docs/([^)#]+)", readme))
    assert {p for p in pages if p.endswith(".md")} <= linked, sorted(pages - linked)
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).resolve().exists(), f"{path.name}: dead link {target}"
                assert "shared" not in Path(target).parts[:2], f"{path.name}: {target} points outside the repository"


# The layers of docs/pipeline.md ("Layers"), top to bottom; a module belongs to its longest matching prefix.
LAYERS = [
    ("rlhf.stages", "rlhf.cli", "rlhf.__main__", "rlhf.smoke", "rlhf.rehearsal", "rlhf.launch", "rlhf.stage_server",
     "rlhf.experiments", "rlhf.schema_doc"),
    ("rlhf.trainer", "rlhf.evaluation", "rlhf.diagnostics", "rlhf.mechanisms", "rlhf.claims", "rlhf.tables",
     "rlhf.figures", "rlhf.results", "rlhf.difficulty"),
    ("rlhf.rewards.proxy_rm", "rlhf.rewards.gold", "rlhf.rewards.verifiable", "rlhf.generation", "rlhf.generation_vllm",
     "rlhf.policy", "rlhf.distributed", "rlhf.judge.client", "rlhf.judge.standin", "rlhf.metrics_log"),
    ("rlhf.models", "rlhf.data", "rlhf.config", "rlhf.registry", "rlhf.rewards.kinds", "rlhf.settings", "rlhf.cluster"),
    ("rlhf.rewards.rules", "rlhf.rewards.llm_judge", "rlhf.judge"),
    ("rlhf.algorithms", "rlhf.errors", "rlhf.paths", "rlhf.io", "rlhf.stats", "rlhf.rng", "rlhf.rewards", "rlhf"),
]


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, group in enumerate(LAYERS) for prefix in group
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def test_imports_point_down_the_layers():
    """Every import between the package's modules (function-level ones included) stays in its layer or goes down."""
    modules = {_module(p): p for p in (REPO / "rlhf").rglob("*.py")}
    upward = [f"{name} (layer {_layer(name)}) imports {m} (layer {_layer(m)})" for name, path in modules.items()
              for m in _imports(path) if m in modules and m != name and _layer(m) < _layer(name)]
    assert not upward, "\n".join(upward)
