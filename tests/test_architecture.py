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


def _module_name(path: Path, root: Path = ANALYSIS) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def _modules(root: Path = ANALYSIS) -> dict[str, Path]:
    return {_module_name(p, root): p for p in root.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path], root: Path = ANALYSIS) -> set[str]:
    """Every moescope.analysis module ``path`` imports, at the top or inside a function: absolute and
    relative ``import`` / ``from … import`` statements, and ``importlib.import_module`` /
    ``__import__`` calls with a constant name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed, not an import of meaning
            continue
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y / from ..floor import z: resolved against this package
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.Call) and node.args and _is_dynamic_import(node.func):
            name = _constant_name(node.args[0], here)
            if name is not None:
                names.append(name)
        out |= {n for n in names if n in modules and n.startswith(PKG)}
    return out


def _is_dynamic_import(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _constant_name(arg: ast.expr, here: str) -> str | None:
    """The module a dynamic import names: a constant string, or ``f"{__name__}.const"``."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first, rest = arg.values[0], arg.values[1:]
        if isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name) and \
                first.value.id == "__name__" and all(isinstance(v, ast.Constant) for v in rest):
            return here + "".join(v.value for v in rest)
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _floor(module: str) -> str | None:
    rest = module[len(PKG) + 1:].split(".") if module != PKG else []
    return rest[0] if rest and rest[0] in FLOORS else None


def _graph(root: Path = ANALYSIS) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(path, modules, root) - {name} for name, path in modules.items()}


def test_the_import_reader_sees_every_form_of_import(tmp_path):
    """The floors test is only as good as its reader: a planted upward import in each form
    (absolute, relative, lazy inside a function, importlib with a constant name) is seen."""
    fake = tmp_path / "analysis"
    (fake / "model").mkdir(parents=True)
    (fake / "run").mkdir()
    for f in ("__init__.py", "model/__init__.py", "run/__init__.py", "run/jobs.py"):
        (fake / f).write_text("", encoding="utf-8")
    forms = {
        "absolute": "from moescope.analysis.run.jobs import start",
        "relative": "from ..run import jobs",
        "relative_module": "from ..run.jobs import start",
        "lazy": "def f():\n    import moescope.analysis.run.jobs as j\n    return j",
        "importlib": "import importlib\nJ = importlib.import_module('moescope.analysis.run.jobs')",
        "dunder": "J = __import__('moescope.analysis.run.jobs')",
    }
    for name, code in forms.items():
        (fake / "model" / f"{name}.py").write_text(code + "\n", encoding="utf-8")
    graph = _graph(fake)
    for name in forms:
        assert graph[f"{PKG}.model.{name}"] & {f"{PKG}.run.jobs", f"{PKG}.run"}, f"the reader misses the {name} form"


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
