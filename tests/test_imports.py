"""handprop's modules import only from below: the package's internal import graph has no cycle."""

import ast
from pathlib import Path

import handprop

PACKAGE = Path(handprop.__file__).parent


def internal_imports(path):
    """The handprop modules a module's source imports, anywhere in it (a lazy import inside a function counts too)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.split(".")[0] == "handprop":
                base = base.removeprefix("handprop").strip(".")
                # `from . import x` and `from handprop import x` name modules; `from .x import y` names one
                imported |= {alias.name for alias in node.names} if not base else {base.split(".")[0]}
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("handprop.")}
    return imported


def import_graph():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: internal_imports(p) & modules for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph):
    """One import cycle as a list of modules (first repeated at the end), or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in graph if (cycle := visit(module))), None)


def test_every_form_of_import_is_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import torch\nimport handprop.layers\nfrom . import data, models\nfrom .losses import CrossEntropy\n"
        "from handprop.optim import SGD\nfrom handprop import sample\n\ndef later():\n    from .report import x\n"
    )
    assert internal_imports(source) == {"layers", "data", "models", "losses", "optim", "sample", "report"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_the_grader_and_the_exercises_both_stand_on_the_lecture():
    graph = import_graph()
    assert "lecture" in graph["grade"] and "ninja" not in graph["grade"]
    assert graph["lecture"] <= {"data", "models"}
