"""The import structure: sparc_core <- index <- service, and inside index each module imports only the
modules before it in the README's Layout order (so there is no import circle, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX_ORDER = [
    "errors", "synthetic_codes", "params", "merge", "ids", "faiss_backend", "seismic_backend", "postings_format",
    "kernels", "postings", "validate", "manifest", "reader", "bundle", "cluster", "queries", "gallery", "searcher",
    "milvus_backend", "opener", "cli",
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


def test_no_service_module_grows_past_500_lines():
    """Every module of service/ (the engine, the client and the search page too) stays under 500 lines."""
    for path in (ROOT / "service").glob("*.py"):
        n = len(path.read_text().splitlines())
        assert n <= 500, f"service/{path.name} has {n} lines: split it by job"


PATH_NAMES = {"sparse", "dense", "approx", "seismic"}


def _bare_paths(path: Path) -> list[str]:
    """Search-path names spelled as strings where a path is meant: compared, offered as choices, given as a
    path default, or as every key of a table."""

    def named(node: ast.AST) -> list[ast.Constant]:
        if isinstance(node, ast.Constant) and node.value in PATH_NAMES:
            return [node]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [c for e in node.elts for c in named(e)]
        return []

    found: list[ast.Constant] = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Compare):
            found += [c for side in (n.left, *n.comparators) for c in named(side)]
        elif isinstance(n, ast.keyword) and n.arg in ("choices", "path", "default_path"):
            found += named(n.value)
        elif isinstance(n, ast.arguments):
            pos = n.args[len(n.args) - len(n.defaults) :]
            for a, d in zip(pos + n.kwonlyargs, list(n.defaults) + list(n.kw_defaults)):
                if d is not None and a.arg in ("path", "default_path"):
                    found += named(d)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id in ("path", "default_path"):
            found += named(n.value) if n.value is not None else []
        elif isinstance(n, ast.Dict) and n.keys and all(isinstance(k, ast.Constant) and k.value in PATH_NAMES for k in n.keys):
            found += [k for k in n.keys if isinstance(k, ast.Constant)]
        elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "Literal":
            found += named(n.slice)
    return [f"{path.relative_to(ROOT)}:{c.lineno} {c.value!r}" for c in found]


def test_search_paths_are_spelled_only_in_params():
    """One SearchPath enum (index/params.py): settings, server, client, UI and CLI take the names from it."""
    bare = []
    for package in ("index", "service", "sparc_core"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "params.py" and "_proto" not in path.parts:
                bare += _bare_paths(path)
    assert not bare, f"search paths spelled as strings (use index.params.SearchPath): {bare}"


def test_bench_imports_only_the_packages():
    """bench/ scripts import the installed packages: no sys.path edits, no sibling scripts, no test modules."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text, f"bench/{path.name} edits sys.path"
        rel, absolute = _imports(path)
        assert not absolute & (scripts | {"tests"}), f"bench/{path.name} imports {sorted(absolute & (scripts | {'tests'}))}"


def test_no_test_module_is_imported_outside_tests():
    for package in ("index", "service", "sparc_core", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            _, absolute = _imports(path)
            assert "tests" not in absolute, f"{path.relative_to(ROOT)} imports tests"


def test_atomic_writes_load_no_torch():
    """sparc_core/atomic.py (every artefact's writes) imports no torch: any command may use it."""
    _, absolute = _imports(ROOT / "sparc_core" / "atomic.py")
    assert not absolute & {"torch", "safetensors", "sparc_core"}, sorted(absolute)


OPTIONAL = {"faiss", "timm", "open_clip", "torchvision", "pymilvus", "milvus_lite", "seismic", "ray", "h5py", "matplotlib"}


def test_optional_dependencies_load_only_through_extras():
    """No module of the packages imports an optional dependency when it is imported itself: each is loaded
    through sparc_core.extras (require / LazyModule) by the feature that needs it."""
    for package in ("sparc_core", "index", "service"):
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" in path.parts:
                continue
            for node in ast.parse(path.read_text()).body:
                names = set()
                if isinstance(node, ast.Import):
                    names = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = {node.module.split(".")[0]}
                assert not names & OPTIONAL, f"{path.relative_to(ROOT)} imports {sorted(names & OPTIONAL)} at load"


# Orderings that are not merges of several sources' results: choosing a heavy query's two common latents,
# sorting one hit's explanation, ranking one Seismic part's candidates by (score, row): the same tie rule.
NOT_MERGES = {("postings.py", "argsort"), ("queries.py", "sort"), ("seismic_backend.py", "lexsort")}


def test_one_top_k_merge():
    """index.merge.merge_order is the only top-k merge: no other sort by descending score in index/ or service/."""
    for package in ("index", "service"):
        for path in (ROOT / package).glob("*.py"):
            if path.name == "merge.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                descending = any(isinstance(a, ast.UnaryOp) and isinstance(a.op, ast.USub) for a in ast.walk(node))
                if fn in ("lexsort", "argsort", "sort", "sorted") and descending and (path.name, fn) not in NOT_MERGES:
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: a second top-k merge; use index.merge")


def test_served_hits_are_explained_from_where_they_are_stored():
    """The service explains hits from the rows (or codes) their search returned: no call that looks an item
    up by id (``explain``, ``item_code``, ``row_of``) anywhere in service/."""
    for path in (ROOT / "service").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("explain", "item_code", "row_of"):
                    raise AssertionError(
                        f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.attr}() looks an id up; use explain_hits"
                    )


def test_the_search_page_reaches_the_service_only_through_the_client():
    """service/ui.py imports no engine (nor the models' stack through it): the client, the image decoder, the
    path names (and, to read captions, the caption reader)."""
    rel, absolute = _imports(ROOT / "service" / "ui.py")
    assert rel <= {"client", "images", "errors"}, sorted(rel)
    assert "torch" not in absolute


def test_the_training_pass_is_composed_of_short_named_steps():
    """SparcModel.forward reads as select -> encode -> decode -> losses: it and each step it calls stay
    under 40 lines, and forward calls every step (a step inlined back into forward fails here)."""
    tree = ast.parse((ROOT / "sparc_core" / "model.py").read_text())
    model = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SparcModel")
    methods = {f.name: f for f in model.body if isinstance(f, ast.FunctionDef)}
    steps = ["_select", "_auxk_select", "_encode_selected", "_decode_all", "_losses"]
    called = {n.func.attr for n in ast.walk(methods["forward"]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert set(steps) <= called, set(steps) - called
    for name in ["forward", *steps, "_fired_alone"]:
        f = methods[name]
        assert f.end_lineno - f.lineno + 1 <= 40, f"SparcModel.{name} is {f.end_lineno - f.lineno + 1} lines"


def test_attribution_is_split_by_job_and_drawing_returns_bytes():
    """One module per job (targets, tower hooks, heatmap methods, caption words, pairs, drawing), none
    over 200 lines; every picture function returns PNG bytes, writing a file is a ``save_*`` helper's job."""
    pkg = ROOT / "sparc_core" / "explain" / "attribution"
    jobs = {"__init__", "targets", "hooks", "heatmaps", "text", "pairs", "drawing"}
    assert {p.stem for p in pkg.glob("*.py")} == jobs
    for p in pkg.glob("*.py"):
        assert len(p.read_text().splitlines()) <= 200, p.name
    tree = ast.parse((pkg / "drawing.py").read_text())
    for f in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("_png")):
        ret = ast.unparse(f.returns) if f.returns else ""
        assert ret == ("Path" if f.name.startswith("save_") else "bytes"), (f.name, ret)


def test_one_word_for_a_stream_encoded_by_itself():
    """ "alone" names the idea (alone_select_prob, l0_alone, encode_alone); the earlier "solo" survives only
    where old config files, flags and calls are still accepted."""
    allowed = {
        "sparc_core/config.py": 1,  # RENAMED_TRAIN_KEYS
        "sparc_core/cli.py": 1,  # renamed(p, "--solo-select-prob", ...)
        "sparc_core/model.py": 5,  # forward's deprecated solo_select parameter
    }
    for pkg in ("sparc_core", "index", "service", "bench"):
        for p in (ROOT / pkg).rglob("*.py"):
            rel = str(p.relative_to(ROOT))
            n = sum("solo" in line for line in p.read_text().splitlines())
            assert n == allowed.get(rel, 0), f"{rel}: 'solo' on {n} lines"


def test_one_versioned_directory_helper_for_checkpoints_and_bundles():
    """Checkpoints and bundles switch versions through sparc_core.atomic.VersionedDir: neither module renames
    a version into place or writes CURRENT itself (a second mechanism fails here)."""
    for rel in ("sparc_core/checkpoint.py", "index/manifest.py"):
        src = (ROOT / rel).read_text()
        assert "VersionedDir(" in src, rel
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                call = ast.unparse(node)
                assert node.func.attr not in ("rename", "replace") or not call.startswith("os."), f"{rel}: {call}"
                assert not (node.func.attr == "atomic_write_bytes" or call.startswith("atomic_write_bytes")), rel
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "atomic_write_bytes":
                assert "POINTER" not in ast.unparse(node) and "CURRENT" not in ast.unparse(node), f"{rel}: {ast.unparse(node)}"


PRODUCT = {
    "__init__", "atomic", "calibrate", "checkpoint", "cli", "cluster", "config", "data", "extract", "extras", "kernels",
    "lazy", "losses", "metrics", "model", "plots", "report", "train",
}  # fmt: skip
GROUPS = {"explain": {"attribution", "concept_report", "naming"},
          "worlds": {"alignment", "demo", "scenes", "scenes_eval", "synthetic", "towers"}}  # fmt: skip


def _sparc_imports(path: Path) -> set[str]:
    """The sparc_core sub-packages (explain, worlds) a file imports, lazy imports included."""
    pkg = path.relative_to(ROOT).parent.parts  # ("sparc_core", ...)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - node.level + 1]) + (node.module.split(".") if node.module else [])
                names = [base + [a.name] for a in node.names] if not node.module else [base]
            else:
                names = [(node.module or "").split(".")]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        found |= {n[1] for n in names if len(n) > 1 and n[0] == "sparc_core" and n[1] in GROUPS}
    return found


def test_sparc_core_shows_the_product_apart_from_explanation_and_the_measuring_worlds():
    """The folder holds the product; explain/ and worlds/ hold theirs (a new module is placed on purpose).
    The product imports neither (the ``sparc`` command, its front, reaches all three); explanation never
    imports a world; every old module path still imports, as the same module."""
    import warnings

    pkg = ROOT / "sparc_core"
    top = {p.stem for p in pkg.glob("*.py")} | {p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}
    assert top == PRODUCT | {"encoders"} | set(GROUPS)
    for group, members in GROUPS.items():
        here = {p.stem for p in (pkg / group).glob("*.py")} | {
            p.name for p in (pkg / group).iterdir() if (p / "__init__.py").exists()
        }
        assert here == members | {"__init__"}, group
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg)
        used = _sparc_imports(path)
        if rel.parts[0] == "explain":
            assert "worlds" not in used, f"{rel}: explanation imports a measuring world"
        elif rel.parts[0] != "worlds" and rel.name not in ("cli.py", "__init__.py") or rel.parts[0] == "encoders":
            assert not used, f"{rel}: the product imports {sorted(used)}"
    import importlib
    import sys

    for group, members in GROUPS.items():
        for m in members:
            sys.modules.pop(f"sparc_core.{m}", None)  # the alias only: the module stays at its new path
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                old = importlib.import_module(f"sparc_core.{m}")
            assert old is importlib.import_module(f"sparc_core.{group}.{m}")
            assert any(w.category is DeprecationWarning and f"sparc_core.{group}.{m}" in str(w.message) for w in caught), m
