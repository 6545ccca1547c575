"""The package's structure: who imports whom (checked on the source, so it holds without running)."""

import ast
from pathlib import Path

import tqindex

ROOT = Path(tqindex.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("tqindex",) + path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _top_level_imports(name: str, tree: ast.Module) -> set[str]:
    """Modules imported at module level (not inside functions: those are lazy by design)."""
    package = name if name in PACKAGES else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
            # `from . import native` imports the submodule; `from .index import Index`, the module.
            found |= submodules or {base}
    return found


MODULES = _modules()
PACKAGES = {n for n in MODULES if (ROOT / Path(*n.split(".")[1:]) / "__init__.py").exists() or n == "tqindex"}


def test_only_tests_import_the_reference_oracle():
    users = [n for n, t in MODULES.items() if n != "tqindex.reference"
             and any(i == "tqindex.reference" or i.startswith("tqindex.reference.") for i in _top_level_imports(n, t))]
    assert users == []


def test_no_import_cycle_in_the_package():
    graph = {n: {i for i in _top_level_imports(n, t) if i in MODULES and i != n} for n, t in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_the_core_imports_no_dataset_tooling():
    """tqdm and h5py serve the datasets and the CLI; the index itself never imports them."""
    for name, tree in MODULES.items():
        if name.startswith("tqindex.datasets") or name == "tqindex.cli":
            continue
        bad = {i for i in _top_level_imports(name, tree) if i.split(".")[0] in ("tqdm", "h5py", "cupy")}
        assert not bad, (name, bad)
        assert not any(i.startswith("tqindex.datasets") for i in _top_level_imports(name, tree)), name
