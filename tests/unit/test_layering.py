"""Imports inside `pipeline/` run one way and never in a circle (docs/architecture.md, "Where things live").

Layers, from the top: entry points -> stages -> model and configs -> errors and file-system helpers.
A module may import its own layer or a lower one; deferred imports inside functions count too.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "pipeline"

ENTRY, STAGE, CORE, BASE = 3, 2, 1, 0
LAYER_NAMES = {ENTRY: "entry point", STAGE: "stage", CORE: "model/config", BASE: "errors/fs"}
# Modules not named here fall into the layer of their package (below).
MODULE_LAYERS = {
    "pipeline.train": ENTRY,
    "pipeline.describe": ENTRY,
    "pipeline.convert": ENTRY,
    "pipeline.cli": ENTRY,
    "pipeline.generate": ENTRY,
    "pipeline.compress.__main__": ENTRY,
    "pipeline.data.__main__": ENTRY,
    "pipeline.config": CORE,
    "pipeline.distributed": CORE,
    "pipeline.checkpoint": CORE,
    "pipeline.checkpoint_writer": CORE,
    "pipeline.metrics": CORE,
    "pipeline.megatron_patches": CORE,
    "pipeline.optimizer_staging": CORE,
    "pipeline.errors": BASE,
    "pipeline.fs": BASE,
    "pipeline.processes": BASE,
    "pipeline": BASE,
    # Config schemas of a stage sit with the configs, so the composition in pipeline.config can
    # import them without importing the stage.
    "pipeline.training.config": CORE,
    "pipeline.data.config": CORE,
    "pipeline.compress.config": CORE,
}
PACKAGE_LAYERS = {
    "pipeline.training": STAGE,
    "pipeline.hf": STAGE,
    "pipeline.data": STAGE,
    "pipeline.compress": STAGE,
    "pipeline.model": CORE,
}
# Only a stage's entry may take the whole RunConfig; everything below takes its slices.
MAY_IMPORT_RUN_CONFIG = {"pipeline.training.loop", "pipeline.training.state"}
NO_RUN_CONFIG_PACKAGES = ("pipeline.model", "pipeline.data", "pipeline.training")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    for package, layer in PACKAGE_LAYERS.items():
        if module == package or module.startswith(package + "."):
            return layer
    raise AssertionError(f"{module} has no layer; add it to tests/unit/test_layering.py")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The pipeline modules `path` imports (at any depth in the file), resolved to module names."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the submodule; `from mod import name` the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_import_graph_sees_known_edges():
    graph = import_graph()
    assert "pipeline.model.params" in graph["pipeline.hf.mapping"]
    assert "pipeline.errors" in graph["pipeline.model.config"]
    assert "pipeline.training.loop" in graph["pipeline.train"], "deferred imports inside functions must count"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (each group imports itself through the others):\n" + "\n".join(
        "  " + " <-> ".join(group) for group in found
    )


def test_imports_run_from_entry_points_down_to_errors():
    graph = import_graph()
    upward = sorted(
        f"{src} ({LAYER_NAMES[layer_of(src)]}) imports {dst} ({LAYER_NAMES[layer_of(dst)]})"
        for src, targets in graph.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    )
    assert not upward, "imports against the layering:\n  " + "\n  ".join(upward)


def test_only_the_training_loop_takes_the_whole_run_config():
    graph = import_graph()
    offenders = sorted(
        src
        for src, targets in graph.items()
        if "pipeline.config" in targets
        and src.startswith(NO_RUN_CONFIG_PACKAGES)
        and src not in MAY_IMPORT_RUN_CONFIG
    )
    assert not offenders, f"import pipeline.config (take the config slices you use instead): {offenders}"
