"""The architecture as a contract: the packages' imports form no circle and point only down the declared layers.

Every `import` / `from ... import` of our packages is read with `ast`, the ones inside functions included
(the code imports heavy modules lazily, and a lazy import is still an arrow). LAYERS lists the layers from
the bottom up; a module belongs to the most specific entry that names it or a package above it. A module
may import its own entry (inside a package) and any entry of a lower layer; entries of one layer are
independent of each other. Each package's `__init__.py` docstring says the same in words.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOTS = ("core", "sweeps", "cluster", "reports", "bench")
LAYERS = [                                                   # bottom first
    ["core.config", "core.entry", "core.faults", "core.net"],  # config plumbing, how a process ends, kill points, a network probe
    ["core.vit"],                                            # the ViT on timm blocks
    ["core.figures"],                                        # attention pictures of a ViT
    ["core.targets", "core.tracking"],                       # what methods regress | what MLflow keeps
    ["core.methods"],                                        # the contract and one module per method
    ["core.training"],                                       # data and the pre-training loop
    ["core.evaluation"],                                     # the protocols, floors, FLOPs
    ["core.job"],                                            # one point end to end, and its validation
    ["sweeps.grid"],                                         # a sweep spec -> grid points
    ["sweeps.plan"],                                         # what each point of a launch does
    ["cluster.backend", "cluster.checks", "cluster.snapshot", "cluster.estimate", "cluster.progress"],  # the backend interface, its helpers, a run's progress
    ["cluster.local", "cluster.slurm", "cluster.task"],      # the backends, and a SLURM task's entry
    ["cluster.launch"],                                      # plan, create runs, hand them to a backend
    ["sweeps.run", "cluster.status", "reports", "core.assets"],  # entry points and scripts
    ["bench"],                                               # measurements of any of the above
]


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str, modules) -> set[str]:
    """The modules of ours that the file imports (anywhere in it), as dotted names."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            # `from core import methods` imports the module core.methods; `from core.config import X` imports core.config
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import core.training.loop` -> core.training.loop
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, entry) of the most specific entry naming the module or a package above it. The top-level
    packages' own __init__ files hold nothing but a docstring: they sit below everything."""
    if module in ROOTS:
        return -1, module
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        i, entry = layer_of(src)
        for dst in sorted(targets):
            j, other = layer_of(dst)
            if j > i or (j == i and other != entry):
                bad.append(f"{src} -> {dst} ({entry}, layer {i} -> {other}, layer {j})")
    return bad


def test_the_packages_import_no_circle():
    assert circles(graph()) == []


def test_every_import_points_down_the_declared_layers():
    assert upward(graph()) == []


def test_every_package_says_what_it_owns_and_may_import():
    for path in sorted((REPO / "core").rglob("__init__.py")):
        if path.parent.name == "assets":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc) > 80 and "May import" in doc, f"{path.relative_to(REPO)} needs a docstring with 'May import'"


# ---- the checker itself catches what it should ---------------------------------------------------------

def test_the_checker_finds_a_circle_and_an_upward_import():
    edges = graph()
    edges["core.config"] = edges["core.config"] | {"core.methods.base"}   # config validation asking the methods
    assert any("core.config" in c and "core.methods.base" in c for c in circles(edges))
    assert any(v.startswith("core.config -> core.methods.base") for v in upward(edges))
    edges = graph()
    edges["sweeps.plan"] = edges["sweeps.plan"] | {"cluster.slurm"}      # the planner reaching into a backend
    assert any(v.startswith("sweeps.plan -> cluster.slurm") for v in upward(edges))
    edges = graph()
    edges["cluster.local"] = edges["cluster.local"] | {"cluster.slurm"}   # siblings are independent
    assert any(v.startswith("cluster.local -> cluster.slurm") for v in upward(edges))


def test_the_scan_sees_lazy_and_from_imports(tmp_path):
    modules = _modules()
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from core import methods\n    import core.training.loop\n"
                   "    from core.config import ConfigError\n    from core.tracking import identity\n")
    assert imports_of(src, "bench.x", modules) == {"core.methods", "core.training.loop", "core.config",
                                                   "core.tracking.identity"}


@pytest.mark.parametrize("module", ["core.methods.mae", "core.targets.hog", "core.evaluation.knn",
                                    "core.tracking.identity", "cluster.slurm", "sweeps.plan"])
def test_every_module_has_a_layer(module):
    assert module in _modules()
    layer_of(module)
