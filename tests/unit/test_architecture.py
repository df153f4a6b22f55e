"""The package's structure, checked from the source: no import cycles, imports only downward through the
layers, and the adapter-method contract stated in one class (ARCHITECTURE.md describes all three).

The import graph is built with ``ast`` from every ``import`` / ``from ... import`` in peftctl/, at module
level and inside functions alike. Imports under ``if TYPE_CHECKING:`` never run and exist only for
annotations: they are left out of the cycle check, but they must respect the layer order too.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from peftctl.adapters.core.method import AdapterMethod
from peftctl.adapters.core.registry import available_methods, get_method

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "peftctl"

# Lowest first. A module may import modules of its own layer or of lower layers, never of a higher one.
# A module belongs to the longest prefix listed (peftctl.adapters.core before peftctl.adapters).
LAYERS: list[tuple[str, ...]] = [
    ("peftctl.errors", "peftctl.utils", "peftctl.devices"),
    ("peftctl.data", "peftctl.models", "peftctl.kernels"),
    ("peftctl.adapters.core",),  # the method-agnostic core: names no method
    ("peftctl.adapters",),  # the methods (lora/, prompt/, one file each for the rest)
    ("peftctl.config",),  # the run config checks `adapter.*` with the chosen method's config class
    ("peftctl.runs", "peftctl.train"),
    ("peftctl.eval", "peftctl.export", "peftctl.data.inspect"),  # data.inspect: the `peftctl data` command
    ("peftctl.sweep", "peftctl.cli", "peftctl.__main__", "peftctl"),
]


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def resolve(name: str) -> str | None:
    """The peftctl module a dotted import name refers to (a name imported from a module -> that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(modules imported when the code runs, modules imported for annotations only)."""
    tree = ast.parse(path.read_text())
    type_only_nodes = {id(n) for block in ast.walk(tree) if is_type_checking_block(block) for n in ast.walk(block)}
    runtime: set[str] = set()
    type_only: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        found = {resolve(t) for t in targets if t.split(".")[0] == "peftctl"} - {None, module}
        (type_only if id(node) in type_only_nodes else runtime).update(found)
    return runtime, type_only


GRAPH: dict[str, tuple[set[str], set[str]]] = {m: imported_modules(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, layer in enumerate(LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer of LAYERS; add it"
    return max(matches)[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_imports_at_module_level_and_inside_functions():
    runtime, type_only = GRAPH["peftctl.adapters.core.method"]
    assert {"peftctl.adapters.core.inject", "peftctl.errors"} <= runtime
    assert "peftctl.adapters.core.model" in type_only
    assert "peftctl.train.run" in GRAPH["peftctl.cli"][0]  # imported inside the command function


def test_no_import_cycle():
    cycle = find_cycle({module: runtime for module, (runtime, _) in GRAPH.items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    runtime, type_only = GRAPH[module]
    upward = sorted(m for m in runtime | type_only if layer_of(m) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports higher layers: {upward}"


def test_every_method_is_an_adapter_method_subclass_defined_at_module_level():
    for name in available_methods():
        method = get_method(name)
        assert isinstance(method, AdapterMethod) and method.name == name
        assert "<locals>" not in type(method).__qualname__, f"{name}: the method class is built inside a function"


def test_no_hook_is_looked_up_with_getattr():
    offenders = [str(p.relative_to(PACKAGE_DIR.parent)) for p in MODULES.values() if "getattr(method" in p.read_text()]
    assert not offenders, f"hooks belong on AdapterMethod, not getattr look-ups: {offenders}"


def test_the_runner_names_no_adapter_method():
    words = set(re.findall(r"\w+", (PACKAGE_DIR / "train" / "run.py").read_text().lower()))
    names = set(available_methods()) | {
        "loftq",
        "eva",
        "corda",
        "pissa",
        "olora",
        "dora",
        "prompt_tuning_init",
        "init_lora_weights",
    }
    named = sorted(names & words)
    assert not named, f"train/run.py names adapter methods {named}; give the method a hook instead"


def test_overridden_hooks_keep_the_contract_signature():
    """A method's hook takes the parameters AdapterMethod states (hooks with *args are free-form)."""
    hooks = [n for n, f in vars(AdapterMethod).items() if inspect.isfunction(f) and not n.startswith("_")]
    mismatched = []
    for name in available_methods():
        method_cls = type(get_method(name))
        for hook in hooks:
            base = inspect.signature(getattr(AdapterMethod, hook))
            if any(p.kind is p.VAR_POSITIONAL for p in base.parameters.values()):
                continue
            own = inspect.signature(getattr(method_cls, hook))
            if list(own.parameters) != list(base.parameters):
                mismatched.append(f"{method_cls.__name__}.{hook}{own} vs {base}")
    assert not mismatched, mismatched
