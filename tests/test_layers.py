"""The package's import graph: no cycles among module-level imports, and the layers point down
(the search core never imports the harness, the reports or the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Lower layers first; a module may import its own layer and the layers below it.
LAYERS = [
    ("core", ("ets.tree", "ets.extract", "ets.answer", "ets.cluster", "ets.selection", "ets.strategies",
              "ets.config", "ets.search", "ets.engines.base", "ets.engines.sampling", "ets.prm.base")),
    ("models", ("ets.engines", "ets.prm", "ets.http", "ets.models", "ets.serve", "ets.tasks")),
    ("harness", ("ets.runs", "ets.runner", "ets.experiment", "ets.admission", "ets.measures", "ets.treeio",
                 "ets.factory", "ets.checks")),
    ("reports", ("ets.report",)),
    ("cli", ("ets.cli", "ets.api")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules of the package imported at module level (not inside functions: a function-level
    import is how a module defers an optional or upward dependency), TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("ets"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ets") and node.level == 0:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
    visit(tree.body)
    return out


def all_imports(path: Path) -> set[str]:
    """Every module of the package that `path` imports anywhere, function bodies included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ets"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ets") and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def graph(anywhere: bool = False) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at module level; `anywhere`: in functions too)."""
    mods = {module_name(p): p for p in SRC.joinpath("ets").rglob("*.py")}
    read = all_imports if anywhere else top_level_imports
    return {name: {m for m in read(path) if m in mods and m != name} for name, path in mods.items()}


def layer_of(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank if rank is not None else len(LAYERS)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m)


# Known upward imports, each to be removed (a new one fails the test): `ets train-prm` lives in
# ets.prm.train and builds its run through the CLI's and the harness's helpers; it belongs above
# them (a verb of its own, with its fitting code beside the reports).
KNOWN_UPWARD = {"ets.prm.train"}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in graph() if layer_of(m) == len(LAYERS) and m != "ets")
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_layers_point_down():
    g = {m: d for m, d in graph(anywhere=True).items() if layer_of(m) < len(LAYERS) and m not in KNOWN_UPWARD}
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {n} ({LAYERS[layer_of(n)][0]})"
           for m, deps in g.items() for n in deps
           if layer_of(n) < len(LAYERS) and layer_of(n) > layer_of(m) and not n.startswith(m.rsplit(".", 1)[0] + ".")]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_a_planted_cycle_is_found(tmp_path, monkeypatch):
    pkg = tmp_path / "ets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ets.b import x\n")
    (pkg / "b.py").write_text("import ets.a\nx = 1\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "ets.a -> ets.b -> ets.a" in str(e)
    else:
        raise AssertionError("the planted cycle was not found")
