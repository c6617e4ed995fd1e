"""The install is honest: what the code imports is declared, and what is declared is imported.

Reads every module of the three packages with `ast` (no import side effects), maps each
third-party import to its distribution with importlib.metadata, and compares with pyproject.toml.
Optional integrations (imported only when their flag is given, with a message naming the package
when it is missing) are listed here explicitly, with the flag that needs them.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "precompute", "train")
# Imported only behind a flag (each checked at start with an install hint): flag -> distribution.
OPTIONAL = {"boto3": "s3:// caches ([s3] extra)", "botocore": "s3:// caches ([s3] extra)",
            "urllib3": "s3:// caches (comes with botocore)", "bitsandbytes": "--use-8bit-adam", "wandb": "--report-to wandb", "tensorboard": "--report-to tensorboard"}


def _imports() -> dict[str, set[str]]:
    """top-level module name -> the files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!;\[ ]", d, maxsplit=1)[0].strip().lower().replace("_", "-")
            for d in project["dependencies"]}


def test_every_import_is_declared_and_every_dependency_is_imported():
    dists = {k: {d.lower().replace("_", "-") for d in v} for k, v in packages_distributions().items()}
    stdlib = set(sys.stdlib_module_names)
    declared = _declared()
    used: set[str] = set()
    undeclared = []
    for module, files in sorted(_imports().items()):
        if module in stdlib or module in PACKAGES or module == "__future__":
            continue
        if module in OPTIONAL:
            continue
        if module == "tomli":  # Python 3.10's tomllib, declared for python_version < '3.11'
            assert "tomli" in declared
            continue
        owners = dists.get(module)
        assert owners, f"{module} (imported by {sorted(files)}) is not installed at all"
        hit = owners & declared
        if not hit:
            undeclared.append(f"{module} ({'/'.join(sorted(owners))}) imported by {sorted(files)}")
        used |= hit
    assert not undeclared, "imported but not in pyproject's dependencies:\n" + "\n".join(undeclared)
    # tomli is Python 3.10's tomllib; torch's companions are used through torch.
    unused = declared - used - {"tomli"}
    assert not unused, f"declared but never imported: {sorted(unused)}"


def _package_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (at any level, lazy imports included)."""
    modules = {p.stem: p for p in (REPO / package).glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
                elif node.module and node.module.startswith(package + "."):
                    deps.add(node.module.split(".")[1])
                elif node.module == package:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
        graph[name] = (deps & set(modules)) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == "open":
            found.append(path[path.index(n):] + [n])
            return
        if state.get(n) == "done":
            return
        state[n] = "open"
        for d in sorted(graph[n]):
            visit(d, path + [n])
        state[n] = "done"

    for n in sorted(graph):
        visit(n, [])
    return found


def test_the_cache_package_imports_form_a_dag():
    graph = _package_graph("shards")
    assert _cycles(graph) == []
    # The exceptions import nothing of the package; the backends never import the factory above them.
    assert graph["errors"] == set()
    assert all("stores" not in graph[m] for m in ("store", "s3", "http", "remote", "localcache"))
    # The contract imports neither stage.
    stage_imports = [
        (path.name, node.module) for path in (REPO / "shards").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level == 0
        and node.module and node.module.split(".")[0] in ("precompute", "train")
    ]
    assert stage_imports == []
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # the check itself finds a circle
