"""Dependencies point inward: the library (tsallis_core) imports neither the Kubeflow layer (tsallis_kubeflow) nor
the checkout's components/ and pipelines/, no module edits sys.path, and the library's modules import each other
without a cycle (every import counts, those inside functions too; ``if TYPE_CHECKING:`` imports do not run)."""

import ast

from conftest import REPO

APP_LAYER = ("tsallis_kubeflow", "components", "pipelines")


def module_imports(package: str) -> dict[str, set[str]]:
    """Every module of ``package`` -> the absolute names it imports (relative imports resolved)."""
    modules = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        where = ".".join(parts[:-1])  # the package that holds the module
        tree = ast.parse(path.read_text())
        type_only = {id(node) for test in ast.walk(tree) if isinstance(test, ast.If) and "TYPE_CHECKING" in
                     ast.unparse(test.test) for stmt in test.body for node in ast.walk(stmt)}
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


def test_no_module_edits_sys_path():
    for package in ("tsallis_core", *APP_LAYER):
        for path in (REPO / package).rglob("*.py"):
            assert "sys.path" not in path.read_text(), path


def test_the_library_has_no_import_cycle():
    modules = module_imports("tsallis_core")
    graph = {m: {i for i in imported if i in modules and i != m and i != "tsallis_core"} for m, imported in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path[path.index(target):], target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
