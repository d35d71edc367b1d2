"""Declared dependencies (pyproject.toml) against what the code imports: every third-party import of the
packages is declared, and every declared dependency is imported or has its reason written below."""
import ast
import importlib.metadata
import re
import sys

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = sorted({p.split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]})
# Declared but never imported by our code, and why each is needed all the same.
USED_WITHOUT_IMPORT = {
    "hydra-submitit-launcher": "a Hydra plugin: `-m hydra/launcher=submitit_slurm` (tests/test_slurm.py)",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group())


def _imports() -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over the packages, absolute imports only."""
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    found.setdefault(n.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def _third_party(imports: dict) -> dict:
    ours = set(PACKAGES)
    return {m: f for m, f in imports.items() if m not in ours and m not in sys.stdlib_module_names
            and m != "__future__"}


def test_every_third_party_import_is_declared():
    declared = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_requirement_name(r) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()
              if extra != "test" for r in reqs}  # an extra's module is imported only when its feature is used
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in sorted(_third_party(_imports()).items()):
        # an extra that is not installed here (bench: mutmut) has no distribution to ask: its module's own name
        owners = {_norm(d) for d in dists.get(module, [])} or {_norm(module)}
        if not owners & (declared | extras):
            missing[module] = (sorted(owners), sorted(files))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_dependency_is_imported_or_says_why():
    dists = importlib.metadata.packages_distributions()
    imported = {_norm(d) for m in _third_party(_imports()) for d in dists.get(m, [])}
    unused = [r for r in PYPROJECT["project"]["dependencies"]
              if _requirement_name(r) not in imported and _requirement_name(r) not in USED_WITHOUT_IMPORT]
    assert not unused, f"declared in pyproject.toml but imported nowhere in {PACKAGES}: {unused}"
    stale = [n for n in USED_WITHOUT_IMPORT if n in imported
             or n not in {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}]
    assert not stale, f"allow-listed but imported, or no longer declared: {stale}"


def test_the_scan_sees_imports_inside_functions():
    """The packages import heavy modules lazily (inside functions): the scan must see those too."""
    imports = _imports()
    assert "core/training/loop.py" in imports["tqdm"]          # `from tqdm import tqdm` inside a function
    assert "numpy" in _third_party(imports) and "json" not in _third_party(imports)


def test_snapshot_copies_the_declared_packages():
    from cluster.snapshot import PACKAGES as SNAPSHOT_PACKAGES
    assert set(SNAPSHOT_PACKAGES) == set(PACKAGES)
