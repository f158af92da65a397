"""The import structure: sparc_core <- index <- service, and inside index each module imports only the
modules before it in the README's Layout order (so there is no import circle, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX_ORDER = [
    "errors", "params", "ids", "faiss_backend", "seismic_backend", "postings_format", "kernels", "postings",
    "validate", "manifest", "reader", "bundle", "cluster", "queries", "gallery", "searcher", "milvus_backend", "opener",
    "cli",
]  # fmt: skip


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package-relative module names, absolute top-level packages) imported anywhere in a file."""
    rel, absolute = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                rel.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module:
                absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            absolute.update(a.name.split(".")[0] for a in node.names)
    return rel, absolute


def test_index_modules_import_only_the_ones_before_them():
    found = {p.stem for p in (ROOT / "index").glob("*.py")} - {"__init__"}
    assert found == set(INDEX_ORDER), f"modules not placed in the layout order: {found ^ set(INDEX_ORDER)}"
    for i, name in enumerate(INDEX_ORDER):
        rel, absolute = _imports(ROOT / "index" / f"{name}.py")
        later = rel - set(INDEX_ORDER[:i])
        assert not later, f"index/{name}.py imports {sorted(later)}, which come after it"
        assert "service" not in absolute, f"index/{name}.py imports the service"


def test_the_library_never_imports_index_or_service():
    for path in (ROOT / "sparc_core").rglob("*.py"):
        _, absolute = _imports(path)
        assert not absolute & {"index", "service"}, f"{path} imports {sorted(absolute & {'index', 'service'})}"


SERVER_MODULES = ["server", "servicer", "admin", "interceptors", "wire", "metrics"]


def test_the_server_is_split_by_job_and_no_part_grows_past_500_lines():
    for name in SERVER_MODULES:
        n = len((ROOT / "service" / f"{name}.py").read_text().splitlines())
        assert n <= 500, f"service/{name}.py has {n} lines: split it by job"
