"""Dependencies point inward: the library (tsallis_core) imports neither the Kubeflow layer (tsallis_kubeflow) nor
the checkout's components/ and pipelines/, no module edits sys.path, each of the library's layers (its folders)
imports only from the layers below it, and the library's modules import each other without a cycle (every import
counts, those inside functions too; ``if TYPE_CHECKING:`` imports do not run)."""

import ast
from pathlib import Path

from conftest import REPO

APP_LAYER = ("tsallis_kubeflow", "components", "pipelines")
# tsallis_core's layers, bottom first: a module may import its own layer and the layers below, never one above
LAYERS = (
    {"maths"},  # losses, estimators, schedules, theory, curves, intervals: tensors and numbers only
    {"data"},  # records, the synthetic task, the reasoning datasets, verifiers
    {"distributed", "tracking", "progress"},  # process groups; MLflow; progress bars
    {"config"},  # the typed settings of a run
    {"rollout"},  # sampling completions and their log-probs
    {"training"},  # the trainer's recipes, engines, checkpoints, models
    {"evaluation"},
    {"studies"},  # the sweep, the escape study, the simulator, plots
    {"prepare", "params", "launch", "cli", "__init__"},  # the params schema and the entry points
)


def module_imports(package: str) -> dict[str, set[str]]:
    """Every module of ``package`` -> the absolute names it imports (relative imports resolved)."""
    modules = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        where = ".".join(parts[:-1])  # the package that holds the module
        tree = ast.parse(path.read_text())
        type_only = {
            id(node)
            for test in ast.walk(tree)
            if isinstance(test, ast.If) and "TYPE_CHECKING" in ast.unparse(test.test)
            for stmt in test.body
            for node in ast.walk(stmt)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = where.rsplit(".", node.level - 1)[0] if node.level > 1 else where
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                found |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
        modules[name] = found
    return modules


def test_the_library_never_imports_the_application_layer():
    for module, imported in module_imports("tsallis_core").items():
        assert not [name for name in imported if name.split(".")[0] in APP_LAYER], module


def test_kubernetes_lives_in_the_kubeflow_layer():
    """The Kubeflow SDKs (kfp, kubeflow.trainer) and the cluster settings are tsallis_kubeflow's alone."""
    for module, imported in module_imports("tsallis_core").items():
        assert not [name for name in imported if name.split(".")[0] in ("kfp", "kubeflow", "kubernetes")], module
    core = "".join(path.read_text() for path in (REPO / "tsallis_core").rglob("*.py"))
    for setting in ("tolerations", "cache_pvc", "node_selector", "ClusterSettings"):
        assert setting not in core, f"tsallis_core mentions {setting}: Kubernetes settings live in tsallis_kubeflow"


def layer_of(module: str) -> int:
    """The layer of ``tsallis_core.X...`` by its folder (or top-level module) X."""
    top = module.split(".")[1] if module.count(".") else "__init__"
    found = [i for i, names in enumerate(LAYERS) if top in names]
    assert found, f"{module}: {top} is in no layer of LAYERS (tests/test_layering.py): add it to one"
    return found[0]


def test_every_layer_imports_only_its_own_layer_and_those_below():
    modules = module_imports("tsallis_core")
    for module, imported in modules.items():
        upward = sorted(i for i in imported if i in modules and i != "tsallis_core" and layer_of(i) > layer_of(module))
        assert not upward, f"{module} imports a layer above it: {', '.join(upward)}"


def test_the_package_shows_its_layers_as_folders():
    top_level = {p.stem for p in (REPO / "tsallis_core").glob("*.py")}
    folders = {p.name for p in (REPO / "tsallis_core").iterdir() if (p / "__init__.py").is_file()}
    assert folders >= {"maths", "data", "rollout", "training", "evaluation", "studies"}
    assert top_level <= set().union(*LAYERS), top_level - set().union(*LAYERS)


def test_no_module_edits_sys_path():
    for package in ("tsallis_core", *APP_LAYER):
        for path in (REPO / package).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path


def test_the_library_has_no_import_cycle():
    modules = module_imports("tsallis_core")
    graph = {
        m: {i for i in imported if i in modules and i != m and i != "tsallis_core"} for m, imported in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path[path.index(target) :], target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_dvc_training_stages_depend_on_every_module_that_tsallis_train_imports():
    """dvc.yaml's training deps (files or folders) cover the import closure of ``tsallis train``: the cli module's
    top-level imports and what its train command imports (the trainer, the config, the params mapping)."""
    import yaml

    modules = module_imports("tsallis_core")
    cli_tree = ast.parse((REPO / "tsallis_core" / "cli.py").read_text())
    cli_imports = {n.module for n in cli_tree.body if isinstance(n, ast.ImportFrom) and n.module in modules}

    def closure_of(roots: set[str]) -> set[str]:
        todo, seen = set(roots), {"tsallis_core.cli"}  # cli's other commands' imports (in their functions) do not run
        while todo:
            module = todo.pop()
            seen.add(module)
            todo |= {i for i in modules[module] if i in modules and i not in seen}
        return seen

    def path_of(module: str) -> str:
        path = Path(*module.split("."))
        return str(path / "__init__.py") if (REPO / path).is_dir() else f"{path}.py"

    train = {"tsallis_core.config", "tsallis_core.training.trainer", *cli_imports}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, roots in (("warmup", train), ("train", train | {"tsallis_core.params"})):  # train: --params
        deps = [d for d in stages[stage]["deps"] if d.startswith("tsallis_core")]
        missing = sorted(
            m
            for m in closure_of(roots)
            if m != "tsallis_core"
            and not any(path_of(m) == d or path_of(m).startswith(d.rstrip("/") + "/") for d in deps)
        )
        assert not missing, f"dvc.yaml stage {stage} does not depend on {', '.join(missing)}"


def test_no_class_in_the_library_is_over_300_lines():
    """Each recipe and component stays readable: a class that grows past 300 lines is split (the trainer became
    training/recipe.py's life cycle plus one recipe per stage)."""
    long = []
    for path in sorted((REPO / "tsallis_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                long.append(f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"classes over 300 lines: {', '.join(long)}"
