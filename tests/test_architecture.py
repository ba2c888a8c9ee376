"""The floors of ``analysis/``: a module imports only its own floor or the floors below it (lazy
imports inside functions count too), sibling floors stay apart, no two modules import each other
through any chain, and ``analysis`` never imports Streamlit. ARCHITECTURE.md draws the same order."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"
PKG = "moescope.analysis"

# floor of each sub-package, lowest first; floors with the same number are siblings and must not
# import each other
FLOORS = {"core": 0, "model": 1, "data": 1, "pruning": 2, "measure": 3, "evaluation": 4, "strategies": 5, "run": 6}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ANALYSIS).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ANALYSIS.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moescope.analysis module ``path`` imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed, not an import of meaning
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        out |= {n for n in names if n in modules and n.startswith(PKG)}
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _floor(module: str) -> str | None:
    rest = module[len(PKG) + 1:].split(".") if module != PKG else []
    return rest[0] if rest and rest[0] in FLOORS else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_sits_on_a_floor():
    loose = [m for m in _modules() if m != PKG and _floor(m) is None]
    assert not loose, f"modules outside the floors {sorted(FLOORS)}: {loose}"


def test_imports_only_go_down_or_sideways_within_a_floor():
    wrong = []
    for mod, targets in _graph().items():
        here = _floor(mod)
        for t in targets:
            there = _floor(t)
            if mod == PKG:
                if there != "core":
                    wrong.append(f"{mod} -> {t} (the package itself imports only core)")
                continue
            if there is None:
                wrong.append(f"{mod} -> {t} (the top package; import from its floor instead)")
            elif FLOORS[there] > FLOORS[here]:
                wrong.append(f"{mod} ({here}) -> {t} ({there}): upward")
            elif FLOORS[there] == FLOORS[here] and there != here:
                wrong.append(f"{mod} ({here}) -> {t} ({there}): sibling floors stay apart")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a circle of meaning: drop the edges
    # from a package to its own children, keep every other edge
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not t.startswith(mod + ".")}
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_analysis_never_imports_streamlit():
    users = []
    for path in ANALYSIS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(m == "streamlit" or m.startswith("streamlit.") for m in mods):
                users.append(str(path.relative_to(ROOT)))
    assert not users, f"analysis/ imports streamlit in {sorted(set(users))}"


def test_the_floors_are_the_documented_ones():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [f for f in FLOORS if f"analysis/{f}/" not in text]
    assert not missing, f"ARCHITECTURE.md does not describe {missing}"
