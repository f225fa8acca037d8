"""handprop's modules import only from below: the package's internal import graph has no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import handprop

PACKAGE = Path(handprop.__file__).parent


def module_name(path):
    """A module's dotted name inside the package: 'train', 'ninja.grade' ('ninja' for ninja/__init__.py)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path, modules, package=()):
    """The modules of `modules` a source file imports, anywhere in it (a lazy import inside a function counts too).

    Names are dotted from the package's root ('ninja.grade'); `package` is the file's own package, which
    relative imports start from (('ninja',) for ninja/grade.py).
    """
    package = list(package)
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "handprop":
                base = node.module.removeprefix("handprop").strip(".")
            else:
                continue
            imported |= {f"{base}.{a.name}".strip(".") for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            imported |= {a.name.removeprefix("handprop.") for a in node.names if a.name.startswith("handprop.")}
    return imported & set(modules)


def import_graph():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): internal_imports(p, modules, p.relative_to(PACKAGE).parent.parts) for p in paths}


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
    modules = {"layers", "data", "models", "losses", "optim", "sample", "report", "train", "ninja", "ninja.grade"}
    assert internal_imports(source, modules) == {"layers", "data", "models", "losses", "optim", "sample", "report"}
    source.write_text("from .. import train\nfrom ..data import Vocab\nfrom .grade import grade\n")
    assert internal_imports(source, modules, ("ninja",)) == {"train", "data", "ninja.grade"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_the_grader_and_the_exercises_both_stand_on_the_exercise_format():
    graph = import_graph()
    assert "ninja.exercise" in graph["ninja.grade"] and "ninja.solutions" not in graph["ninja.grade"]
    assert graph["ninja.exercise"] == set()
    exercises = [m for m in graph if m.startswith("ninja.exercises.")]
    assert "ninja.exercises.mlp" in exercises
    # an exercise may share a helper with its neighbours (rnn and gru: through_time), never the grader's modules
    assert all(graph[m] <= {"ninja.exercise", "data", "models", "layers", *exercises} for m in exercises)


def reachable(graph, module):
    """Every module that importing module loads, itself included."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(graph[current])
    return seen


def test_evaluation_and_sampling_stand_without_the_training_loop():
    graph = import_graph()
    for module in ("evaluation", "sample", "settings", "workdir", "progress", "stops", "memory"):
        assert "train" not in reachable(graph, module), module


def test_eval_and_sample_do_not_load_the_training_loop(trained_dir):
    work_dir = repr(str(trained_dir))
    script = ("import sys; from handprop.cli import main\n"
              f"for argv in (['eval', '-o', {work_dir}], ['sample', '-n', '2', '-o', {work_dir}]):\n"
              "    assert main(argv) == 0\n"
              "assert 'handprop.train' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
