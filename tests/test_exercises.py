"""Every exercise of the registry, graded by the engine: a new exercise is covered the moment it is registered.

Its worked solution matches autograd and grades all ok; its starters run (a script, and a notebook in a
real Jupyter kernel) with every gradient missing; each pitfall and forward slip is flagged on its own row
with its hint, never on the right solution; and every gradient assignment of the solution, mutated, is
caught on its own row. Grading runs in-process, on files written the way a learner's are.
"""

import ast
import io
import re
import time
from dataclasses import replace

import nbformat
import pytest
from nbclient import NotebookClient

from handprop.cli import main
from handprop.ninja.exercise import check_solution
from handprop.ninja.exercises import EXERCISES
from handprop.ninja.grade import grade_script
from handprop.ninja.starter import solution_source

# mutants that leave the graded value as it was (within the grader's tolerance), each with why: reviewed by hand.
# The mutation test fails when a mutant survives that is not listed here, and when a listed one is caught.
EQUIVALENT = {
    "mlp": {
        ("dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes", kind):
            "dlogit_maxes is zero up to rounding: the softmax does not change when a row is shifted"
        for kind in ("negated", "scaled by 1.5")
    } | {
        ("dlogit_maxes = -dnorm_logits.sum(1, keepdim=True)", kind):
            "dlogit_maxes is zero up to rounding: the softmax does not change when a row is shifted"
        for kind in ("negated", "scaled by 1.5")
    } | {
        ("db1 = dhprebn.sum(0)", kind): "db1 is zero up to rounding: BatchNorm subtracts any constant shift of hprebn"
        for kind in ("negated", "scaled by 1.5")
    } | {
        ("dhprebn = bngain * bnvar_inv / n * (", f"keepdim changed in {reduction}"):
            "a (64,) row broadcasts over the batch exactly as a (1, 64) one does"
        for reduction in ("dhpreact.sum(0, keepdim=True)", "(dhpreact * bnraw).sum(0, keepdim=True)")
    },
    "wavenet": {
        ("dhprebn_1 = bngain_1 * bnvar_inv_1 / n1 * (", f"keepdim changed in {reduction}"):
            "a (16,) row broadcasts over (B, T, 16) exactly as a (1, 1, 16) one does"
        for reduction in ("dhpreact_1.sum((0, 1), keepdim=True)", "(dhpreact_1 * bnraw_1).sum((0, 1), keepdim=True)")
    },
    "attention": {
        (line, kind): "dscore_maxes is zero up to rounding: the softmax does not change when a row is shifted"
        for line in ("dscore_maxes = -dnorm_scores.sum(-1, keepdim=True)",
                     "dscores_masked += F.one_hot(scores_masked.argmax(-1), T) * dscore_maxes")
        for kind in ("negated", "scaled by 1.5")
    },
}

REDUCTIONS = {"sum", "mean", "max", "min", "amax", "amin", "prod", "var", "std", "logsumexp", "norm"}


def quiet_grade(path):
    return grade_script(path, io.StringIO())


def script(exercise, solution_code):
    """A learner's file of exercise with solution_code as its backward (no grading call: graded from outside)."""
    return solution_source(replace(exercise, solution_code=solution_code)).rsplit("\nresult = grade(", 1)[0] + "\n"


def first_line(exercise, solution_code):
    """The line of script(exercise, solution_code) that solution_code's first line is on."""
    text = script(exercise, solution_code)
    return text[: text.index(solution_code)].count("\n") + 1


def lines_in(where):
    """The line numbers a row's where ('line 7', 'lines 7-9') covers."""
    first, last = re.fullmatch(r"(?:cell \d+, )?lines? (\d+)(?:-(\d+))?", where).groups()
    return range(int(first), int(last or first) + 1)


def written_gradient(node, exercise):
    """The gradient a statement assigns (d<name> as a name, or indexed), or None."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
    for target in targets:
        while isinstance(target, (ast.Subscript, ast.Attribute)):
            target = target.value
        if isinstance(target, ast.Name) and target.id[1:] in exercise.gradients and target.id.startswith("d"):
            return target.id[1:]
    return None


def writes(statement, exercise):
    """The gradients a top-level statement writes, anywhere inside it (a loop's body too)."""
    return {written_gradient(n, exercise) for n in ast.walk(statement)} - {None}


def reads(statement, name):
    read = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return ("d" + name) in read or isinstance(statement, ast.AugAssign)


def last_version(exercise, name):
    """The top-level statements of the solution that write the last version of d<name> (as the grader splits them)."""
    statements = []
    for statement in ast.parse(exercise.solution_code).body:
        if name in writes(statement, exercise):
            statements = statements + [statement] if reads(statement, name) and statements else [statement]
    return statements


def replace_lines(source, replacements):
    """source with the line ranges (first, last; 1-based) replaced by text, keeping every other line's number."""
    lines = source.splitlines()
    for (first, last), text in sorted(replacements.items(), reverse=True):
        new = text.splitlines()
        lines[first - 1: last] = new + [""] * (last - first + 1 - len(new))
    return "\n".join(lines) + "\n"


def row_at(result, name, lines):
    """The row of the version of name written on one of lines; None when no version of it was written there."""
    rows = [r for r in result.rows if r.name == name and r.where and set(lines) & set(lines_in(r.where))]
    return rows[0] if rows else None


@pytest.fixture(scope="module")
def solutions(tmp_path_factory):
    """Each exercise's worked solution as a learner's file, graded: {name: (path, result)}."""
    folder = tmp_path_factory.mktemp("solutions")
    graded = {}
    for name, exercise in EXERCISES.items():
        path = folder / f"{name}.py"
        path.write_text(script(exercise, exercise.solution_code))
        graded[name] = path, quiet_grade(path)
    return graded


@pytest.mark.parametrize("name", EXERCISES)
def test_the_solution_matches_autograd_in_float64(name):
    rows = check_solution(EXERCISES[name])
    assert [r[0] for r in rows] == ["d" + g for g in EXERCISES[name].gradients]
    assert all(relative <= 1e-12 for _, _, relative in rows), rows


@pytest.mark.parametrize("name", EXERCISES)
def test_the_written_solution_grades_every_row_ok(name, tmp_path, capsys):
    path = tmp_path / "s.py"
    assert main(["exercise", "solution", name, "-o", str(path)]) == 0
    assert path.read_text().startswith(f"# handprop exercise: {name}\n")
    capsys.readouterr()
    assert main(["grade", str(path)]) == 0
    out = capsys.readouterr().out
    # the summary counts only ok rows: every forward step and every version of every gradient is right
    written = len(EXERCISES[name].gradients) + len(EXERCISES[name].fused)
    assert out.count("forward pass: ") == 1 and "forward pass: " in out
    assert re.search(rf"\nforward: 0 wrong; gradients: {written} ok -- all right\n$", out), out[-300:]


@pytest.mark.parametrize("name", EXERCISES)
def test_the_script_starter_runs_and_grades_every_gradient_missing(name, tmp_path, capsys):
    path = tmp_path / "start.py"
    assert main(["exercise", "start", name, "-o", str(path)]) == 0
    assert main(["grade", str(path)]) == 1         # nothing written is nothing right
    out = capsys.readouterr().out
    gradients = len(EXERCISES[name].gradients)
    assert out.rstrip().endswith(f"forward: 0 wrong; gradients: {gradients} missing -- nothing written yet: write the "
                                 "gradients and grade again")
    assert out.count("not written yet") == gradients    # its cmp lines ran, one per blank
    assert main(["exercise", "start", name, "-o", str(path)]) == 2     # never overwritten
    assert "exists already" in capsys.readouterr().err


def test_every_notebook_starter_runs_in_one_jupyter_kernel(tmp_path):
    """One kernel start for all: the notebooks' cells in turn, the kernel's names cleared between them."""
    cells = []
    for name in EXERCISES:
        path = tmp_path / f"{name}.ipynb"
        assert main(["exercise", "start", name, "-o", str(path)]) == 0
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.cells[0].cell_type == "markdown" and EXERCISES[name].page in notebook.cells[0].source
        cells += [nbformat.v4.new_code_cell("%reset -f")] + notebook.cells
    combined = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(combined, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = [o for cell in combined.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for exercise in EXERCISES.values():
        assert f"gradients: {len(exercise.gradients)} missing -- nothing written yet" in printed


def pitfalls():
    return [pytest.param(name, i, id=f"{name}-d{p.gradient}-{i}")
            for name, e in EXERCISES.items() for i, p in enumerate(e.pitfalls)]


@pytest.mark.parametrize(("name", "index"), pitfalls())
def test_each_pitfall_is_wrong_on_its_row_with_its_hint(name, index, tmp_path):
    exercise = EXERCISES[name]
    known = exercise.pitfalls[index]
    statements = last_version(exercise, known.gradient)
    assert statements, f"the solution never writes d{known.gradient}"
    last, slip = statements[-1], known.slip.rstrip("\n").splitlines()
    if all(writes(s, exercise) == {known.gradient} for s in statements):
        # the slip replaces the version's lines, in the place of its last one, where everything it reads is computed
        lines = replace_lines(exercise.solution_code, {(s.lineno, s.end_lineno): "" for s in statements}).splitlines()
        at = last.lineno - 1
    else:   # lines that also write other gradients (a loop through time) stay: the slip comes after them
        lines, at = exercise.solution_code.splitlines(), last.end_lineno
    lines[at:at] = slip
    code = "\n".join(lines) + "\n"
    path = tmp_path / "slip.py"
    path.write_text(script(exercise, code))
    result = quiet_grade(path)
    assert not result.ok
    first = first_line(exercise, code) + at
    row = row_at(result, "d" + known.gradient, range(first, first + len(slip)))
    assert row is not None and row.status == "wrong", (row, result.table())
    assert known.hint in row.message
    before = result.rows[: result.rows.index(row)]
    assert not [r.label for r in before if r.status == "wrong"]


@pytest.mark.parametrize("name", EXERCISES)
def test_no_hint_is_shown_on_the_right_solution(name, solutions):
    _, result = solutions[name]
    assert result.ok and all(r.status == "ok" for r in result.rows)
    exercise = EXERCISES[name]
    hints = [p.hint for p in exercise.pitfalls] + [s.hint for s in exercise.forward_slips]
    assert not [(r.label, h) for r in result.rows for h in hints if h in r.message]


def forward_slips():
    return [pytest.param(name, i, id=f"{name}-{s.name}-{i}")
            for name, e in EXERCISES.items() for i, s in enumerate(e.forward_slips)]


@pytest.mark.parametrize(("name", "index"), forward_slips())
def test_each_forward_slip_is_wrong_on_its_row_with_its_hint(name, index, tmp_path):
    exercise = EXERCISES[name]
    slip = exercise.forward_slips[index]
    (line,) = [line for line in exercise.forward_code.splitlines() if line.startswith(f"{slip.name} = ")]
    path = tmp_path / "slip.py"
    path.write_text(script(exercise, exercise.solution_code).replace(line, f"{slip.name} = {slip.slip}", 1))
    result = quiet_grade(path)
    row = result[slip.name]
    assert row.section == "forward" and row.status == "wrong" and slip.hint in row.message
    assert not [r.label for r in result.rows[: result.rows.index(row)] if r.status == "wrong"]


# ---- mutation test ----

def mutations(statement):
    """[(kind, mutated statement)]: at least three ways to get one gradient assignment wrong."""
    value = statement.value
    out = [("negated", replace_value(statement, ast.UnaryOp(ast.USub(), value))),
           ("scaled by 1.5", replace_value(statement, ast.BinOp(value, ast.Mult(), ast.Constant(1.5))))]
    for i, node in enumerate(ast.walk(value)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in REDUCTIONS:
            flipped = [k for k in node.keywords if k.arg == "keepdim"]
            keepdim = not (flipped and flipped[0].value.value)
            if flipped or node.args:
                change = lambda n, keepdim=keepdim: set_keepdim(n, keepdim)     # noqa: E731
                out.append((f"keepdim changed in {ast.unparse(node)}", edited(statement, i, change)))
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, int):
                out.append((f"dim changed in {ast.unparse(node)}", edited(statement, i, other_dim)))
        if isinstance(node, ast.Attribute) and node.attr in ("T", "mT"):
            out.append((f"transpose dropped: {ast.unparse(node)}", edited(statement, i, lambda n: n.value)))
    if isinstance(statement, ast.AugAssign) and isinstance(statement.op, ast.Add):
        out.append(("+= turned into =", ast.Assign([statement.target], statement.value, lineno=statement.lineno)))
    if len(out) < 3:
        out.append(("shifted by 0.5", replace_value(statement, ast.BinOp(value, ast.Add(), ast.Constant(0.5)))))
    return out


def replace_value(statement, value):
    copy = ast.parse(ast.unparse(statement)).body[0]
    copy.value = value
    return copy


def edited(statement, index, change):
    """A copy of statement with the index-th node of its value (in ast.walk order) changed by change."""
    copy = ast.parse(ast.unparse(statement)).body[0]
    nodes = list(ast.walk(copy.value))
    target = nodes[index]
    new = change(target)
    if new is not target:
        for parent in ast.walk(copy):
            for field, child in ast.iter_fields(parent):
                if child is target:
                    setattr(parent, field, new)
                elif isinstance(child, list) and target in child:
                    child[child.index(target)] = new
    return copy


def set_keepdim(call, keepdim):
    call.keywords = [k for k in call.keywords if k.arg != "keepdim"] + [ast.keyword("keepdim", ast.Constant(keepdim))]
    return call


def other_dim(call):
    call.args[0] = ast.Constant(1 if call.args[0].value == 0 else call.args[0].value - 1)
    return call


def gradient_assignments(exercise):
    """Every statement of the solution assigning a gradient (inside loops too), but not one that only makes zeros:
    negating or scaling zeros changes nothing, and no learner gets a zeros_like wrong."""
    out = []
    for node in ast.walk(ast.parse(exercise.solution_code)):
        name = written_gradient(node, exercise)
        if name is None:
            continue
        zeros = isinstance(node.value, ast.Call) and ast.unparse(node.value.func) in ("torch.zeros_like", "torch.zeros")
        if not zeros:
            out.append((name, node))
    return out


@pytest.mark.parametrize("name", EXERCISES)
def test_every_mutant_of_the_solution_is_caught_on_its_row(name, tmp_path, capsys):
    exercise = EXERCISES[name]
    source = exercise.solution_code.splitlines()
    start, path, survivors, missed, count = time.perf_counter(), tmp_path / "mutant.py", set(), [], 0
    for gradient, statement in gradient_assignments(exercise):
        original = source[statement.lineno - 1].strip()
        assert len(mutations(statement)) >= 3
        for kind, mutant in mutations(statement):
            indent = source[statement.lineno - 1][: len(source[statement.lineno - 1]) - len(original)]
            code = replace_lines(exercise.solution_code,
                                 {(statement.lineno, statement.end_lineno): indent + ast.unparse(mutant)})
            path.write_text(script(exercise, code))
            count += 1
            result = quiet_grade(path)
            line = first_line(exercise, code) + statement.lineno - 1
            row = row_at(result, "d" + gradient, [line])
            crashed_here = result.crash and f"line {line} raised" in result.crash.splitlines()[0]
            if result.ok or (row is None and not crashed_here) or (row is not None and row.status != "wrong"):
                survivors.add((original, kind))
                continue
            first = row or next(r for r in result.rows if r.name == "d" + gradient)
            wrong_before = [r.label for r in result.rows[: result.rows.index(first)] if r.status == "wrong"]
            if wrong_before:
                missed.append((original, kind, wrong_before))
    equivalent = EQUIVALENT.get(name, {})
    caught, changing = count - len(survivors), max(1, count - len(equivalent))
    with capsys.disabled():
        print(f"\n{name}: {caught} of {count} mutants caught on their own row ({len(equivalent)} equivalent, listed "
              f"with why): {100 * caught / changing:.0f}% of those that change the value, "
              f"in {time.perf_counter() - start:.1f} s")
    assert not missed, f"rows computed before the mutated one were marked WRONG: {missed}"
    assert survivors == set(equivalent), (
        f"not caught and not listed as equivalent: {sorted(survivors - set(equivalent))}; "
        f"listed but caught: {sorted(set(equivalent) - survivors)}")
