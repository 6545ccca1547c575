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


def test_the_core_never_imports_the_framework_adapters():
    """LangChain, LlamaIndex and Ray are extras: only tqindex.integrations and tqindex.distributed
    import them, and no other module imports those two."""
    import subprocess
    import sys
    for name, tree in MODULES.items():
        imports = _top_level_imports(name, tree)
        if name.startswith("tqindex.integrations") or name == "tqindex.distributed":
            continue
        assert not any(i.split(".")[0] in ("langchain_core", "llama_index", "ray") for i in imports), name
        assert not any(i.startswith(("tqindex.integrations", "tqindex.distributed")) for i in imports), name
    code = ("import sys, tqindex, numpy as np; i = tqindex.Index(dim=8, bits=2); i.add(np.ones((2, 8), np.float32));"
            "i.search(np.ones(8, np.float32), 1); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('langchain_core', 'llama_index', 'ray', 'cupy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
