"""Imports inside `pipeline/` run one way and never in a circle (docs/architecture.md, "Where things live").

Layers, from the top: entry points -> stages -> model and configs -> errors and file-system helpers.
A module may import its own layer or a lower one; deferred imports inside functions count too.

The layer of a module follows from where it is, by these rules; the tables below hold only what the
rules cannot say:
- an entry point is a module that runs as a program (an `if __name__ == "__main__":` block, or a
  `__main__.py`): the commands `pipeline/<command>.py` and a stage's `__main__.py`, and the worker
  processes a command starts (`WORKERS`);
- a stage is a package under `pipeline/` that does one job of the pipeline (`STAGES`); its `config`
  module is a config schema and sits with the configs, so `pipeline.config` can compose it without
  importing the stage;
- everything else (top-level modules, `pipeline/model/`, `pipeline/checkpoint/`) is model/config,
  except the base helpers (`BASE_MODULES`).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "pipeline"

ENTRY, STAGE, CORE, BASE = 3, 2, 1, 0
LAYER_NAMES = {ENTRY: "entry point", STAGE: "stage", CORE: "model/config", BASE: "errors/fs"}
STAGES = ("pipeline.training", "pipeline.hf", "pipeline.data", "pipeline.compress", "pipeline.migrate")
BASE_MODULES = {"pipeline", "pipeline.errors", "pipeline.fs", "pipeline.processes"}
# The glue every command uses (Hydra apps, one-line errors): a layer with the commands, not below them.
ENTRY_LIBRARIES = {"pipeline.cli"}
# Worker processes started by a command (torchrun), with a `__main__` block beside the work they do.
WORKERS = {"pipeline.hf.import_", "pipeline.migrate.import_"}
# Only a stage's entry may take the whole RunConfig; everything below takes its slices.
MAY_IMPORT_RUN_CONFIG = {"pipeline.training.loop", "pipeline.training.state",
                         "pipeline.data.__main__"}  # a command: `lengths --config` composes a training config
NO_RUN_CONFIG_PACKAGES = ("pipeline.model", "pipeline.data", "pipeline.training", "pipeline.checkpoint")


def runs_as_program(path: Path) -> bool:
    """True for a `__main__.py` or a module with a top-level `if __name__ == "__main__":` block."""
    if path.name == "__main__.py":
        return True
    for node in ast.parse(path.read_text(), str(path)).body:
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)):
            return True
    return False


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    path = module_path(module)
    if module in ENTRY_LIBRARIES or runs_as_program(path):
        return ENTRY
    if module in BASE_MODULES:
        return BASE
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return CORE if module == f"{stage}.config" else STAGE
    return CORE


def module_path(module: str) -> Path:
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


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


def test_programs_are_commands_or_workers():
    """Commands are `pipeline/<command>.py` or a stage's `__main__.py` (docs/architecture.md); any other
    module that runs as a program must be a worker a command starts (WORKERS)."""
    stray = sorted(
        name for name in import_graph()
        if runs_as_program(module_path(name)) and name.count(".") > 1 and not name.endswith(".__main__")
        and name not in WORKERS
    )
    assert not stray, f"modules that run as programs outside the command rule (make them a subcommand): {stray}"


def test_the_layer_rules_see_known_modules():
    assert layer_of("pipeline.train") == ENTRY and layer_of("pipeline.compress.__main__") == ENTRY
    assert layer_of("pipeline.compress.config") == CORE and layer_of("pipeline.compress.prune") == STAGE
    assert layer_of("pipeline.checkpoint.writer") == CORE and layer_of("pipeline.errors") == BASE


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
