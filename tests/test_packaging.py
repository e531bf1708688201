"""What a release needs: no import cycles, one version, the command line's usage and version."""

import ast
from pathlib import Path

import pytest

import srpo_trl
from srpo_trl.cli import main as cli_main


REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "srpo_trl"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its code (a function-level import is
    still an edge: it runs, and it ties the two modules together). `from .x import name` is an
    edge to the module `x.name` when that is a module, else to `x`."""
    modules = _module_names()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "srpo_trl"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "srpo_trl":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else owner(target))
        graph[name] = edges - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = import_graph()
    assert "srpo_trl.trainer" in graph["srpo_trl.recipe_runner"]  # a function-level import is an edge
    graph["srpo_trl.store"] = graph["srpo_trl.store"] | {"srpo_trl.guards"}  # guards imports store
    assert cycles(graph) == [["srpo_trl.guards", "srpo_trl.store"]]


@pytest.mark.parametrize("old", ["srpo_trl.train", "srpo_trl.logging_callbacks"])
def test_alias_modules_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        __import__(old)


def test_train_without_arguments_prints_usage_and_exits_2(capsys):
    assert cli_main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: srpo-trl train --config RECIPE.yaml")


def test_version_flag(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"srpo-trl {srpo_trl.__version__}\n"
