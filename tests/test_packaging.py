"""What a release needs: no import cycles, one version source, the command line's usage and version,
a license and a citation that agree everywhere, and an sdist whose tests run (the wheel: the package only)."""

import ast
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

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


# ---- version, license, citation ----------------------------------------------------------------------


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_one_version_source():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "srpo_trl.__version__"}
    assert "version" not in yaml.safe_load((REPO / "CITATION.cff").read_text())


def _bibtex_authors(bibtex: str) -> list[tuple[str, str]]:
    field = re.search(r"author\s*=\s*\{(.+?)\},", bibtex)[1]
    return [tuple(name.split(", ", 1)) for name in field.split(" and ")]  # (family, given)


def test_the_paper_is_cited_the_same_way_everywhere():
    """CITATION.cff's preferred citation, the model card's BibTeX and the README's Citation section
    name the same paper, authors and DOI."""
    from srpo_trl import SRPOTrainer

    bibtex = SRPOTrainer._paper["citation"]
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    paper = cff["preferred-citation"]
    assert cff["cff-version"] == "1.2.0" and cff["license"] == _pyproject()["project"]["license"] == "Apache-2.0"
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == _bibtex_authors(bibtex)
    assert len(paper["authors"]) == 9
    assert paper["doi"] == "10.48550/arXiv.2509.12060" and f"doi          = {{{paper['doi']}}}" in bibtex
    assert f"{{{{{paper['title']}}}}}" in bibtex and paper["title"] == SRPOTrainer._paper["title"]
    assert (paper["year"], paper["volume"], paper["issue"]) == (2026, 40, 42)
    readme = (REPO / "README.md").read_text()
    assert f"```bibtex\n{bibtex}\n```" in readme.split("## Citation", 1)[1]


def test_license_is_the_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 200


# ---- the sdist and the wheel ---------------------------------------------------------------------------


def _build(kind: str, source: Path, out: Path) -> Path:
    """Build with setuptools' PEP 517 backend, as `python -m build` / pip would (no isolation here:
    the backend is the one pyproject.toml asks for, already installed)."""
    code = f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def unpacked_sdist(out: Path) -> Path:
    """The sdist of this checkout, built into ``out`` and unpacked there: its root folder."""
    archive = _build("sdist", REPO, out)
    with tarfile.open(archive) as tar:
        tar.extractall(out / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (root,) = (out / "unpacked").iterdir()
    return root


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist built from this checkout, unpacked: its root folder."""
    return unpacked_sdist(tmp_path_factory.mktemp("dist"))


def _files(root: Path, folder: str) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in (root / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_sdist_ships_the_tests_with_what_they_import_and_read(sdist):
    shipped = {str(p.relative_to(sdist)) for p in sdist.rglob("*") if p.is_file()}
    for helper in ("conftest.py", "helpers.py", "arch_models.py", "iterable_rows.py", "openai_server.py"):
        assert f"tests/{helper}" in shipped
    for folder in ("tests", "recipes", "benchmarks", "docs", "srpo_trl"):
        missing = _files(REPO, folder) - shipped
        assert not missing, f"not in the sdist: {sorted(missing)[:10]}"
    assert {"LICENSE", "CITATION.cff", "srpo_trl/py.typed", "pyproject.toml", "Makefile"} <= shipped


def test_sdist_metadata(sdist):
    info = (sdist / "PKG-INFO").read_text()
    assert f"\nVersion: {srpo_trl.__version__}\n" in info
    assert "\nLicense-Expression: Apache-2.0\n" in info and "\nLicense-File: LICENSE\n" in info
    assert (
        "\nClassifier: Typing :: Typed\n" in info
        and "\nProject-URL: Paper, https://arxiv.org/abs/2509.12060\n" in info
    )


def test_tests_run_from_the_unpacked_sdist(sdist):
    """A small subset, run with the sdist's own package (not this checkout's)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [sys.executable, "-c", "import srpo_trl; print(srpo_trl.__file__)"],
        cwd=sdist,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()) == sdist / "srpo_trl" / "__init__.py"
    selection = "no_import_cycles or version_flag or usage_and_exits_2 or one_version_source"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_packaging.py", "-k", selection],
        cwd=sdist,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_the_wheel_built_from_the_sdist_holds_the_package_only(sdist, tmp_path):
    wheel = _build("wheel", sdist, tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "srpo_trl/py.typed" in names and "srpo_trl/trainer.py" in names
    assert f"srpo_trl-{srpo_trl.__version__}.dist-info/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "benchmarks/", "docs/"))]
