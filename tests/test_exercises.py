"""Every exercise of the registry, its data checked and graded by the engine: a new exercise is covered the moment
it is registered (tests/test_exercise_<name>.py hold only what one exercise has of its own).

Its data: the worked solution (and its step-by-step part) matches autograd in float64 and, run as a float32
file, stays within the grader's tolerance; the forward is finite with the shapes its comments say; the setup
is seeded with float32, non-trivial parameters; gradients come in an order a backward can follow and the
solution writes them so; every slip is wrong and apart from the others; lookups repeat an index; the
derivation page shows exactly the exercise's code. Graded: the solution grades all ok; its starters run (a
script, and a notebook in a real Jupyter kernel) with every gradient missing; each pitfall and forward slip
is flagged on its own row with its hint, never on the right solution; and every gradient assignment of the
solution, mutated, is caught on its own row. Grading runs in-process, on files written the way a learner's are.
"""

import ast
import io
import re
import time
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest
import torch
from exercise_checks import check_solution, lines_in, relative, solved
from nbclient import NotebookClient

from handprop.cli import main
from handprop.ninja.exercise import (
    MODULES,
    forward,
    parse_forward,
    reference_gradients,
    run_code,
    run_setup,
)
from handprop.ninja.exercises import EXERCISES
from handprop.ninja.grade import RTOL, grade_script
from handprop.ninja.starter import solution_source

SOLUTION_RTOL = 1e-12   # a worked solution: max |solution - autograd| in float64, relative to the gradient's scale
FLOAT32_RTOL = 1e-5     # the solution run as a learner's float32 file, against autograd in float32
SLIP_APART = 1e-3       # a slip differs from the right value, and from its gradient's other slips, by more (relative)
PITFALLS_AT_LEAST = {"attention": 10, "transformer-block": 10}     # the others have at least 4
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOCS = Path(__file__).resolve().parents[1] / "docs"

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

# slips that break a rule every other slip keeps, each with why: reviewed by hand. The slip tests fail when a slip
# breaks a rule and is not listed here, and when a listed one breaks none.
REVIEWED_SLIPS = {
    ("mlp", "dbnvar = -0.5 * bnvar**-1.5 * dbnvar_inv  # no eps\n"):
        "the lecture's forgotten eps moves dbnvar by 4e-5 of its scale, not 1e-3: four times the grader's RTOL, and "
        "test_grade tells it apart from the right formula",
    ("mlp", "hprebn - bnmeani * bnvar_inv"):
        "the lecture's precedence slip reads hprebn and bnmeani, what bnraw's input bndiff was computed from",
}

REDUCTIONS = {"sum", "mean", "max", "min", "amax", "amin", "prod", "var", "std", "logsumexp", "norm"}


# ---- the exercise's data, checked in float64 before any grader reads it ----

def readers(exercise):
    """{tensor: the forward steps that read it}."""
    found = {}
    for name, step in exercise.steps().items():
        for read in step.inputs:
            found.setdefault(read, []).append(name)
    return found


def step_by_step(exercise):
    """The solution before its one-step formulas (all of it when the exercise has none)."""
    formulas = "".join(f"\n# {fused.title}\n{fused.code}" for fused in exercise.fused)
    assert exercise.solution_code.endswith(formulas)
    return exercise.solution_code[: len(exercise.solution_code) - len(formulas)]


def declared_shapes(exercise, constants):
    """{name: shape} as each forward line's comment writes it: `# (B, T, n_embd) ...`, `# (4, 5, 12): ...`, `# ()`,
    or `# scalar ...`."""
    shapes = {}
    for line in exercise.forward_code.splitlines():
        found = re.fullmatch(r"(\w+) = .*?\s#\s*(scalar|\([^)]*\)).*", line)
        assert found, f"no shape comment: {line}"
        name, comment = found.groups()
        declared = eval("()" if comment == "scalar" else comment, {}, dict(constants))
        shapes[name] = declared if isinstance(declared, tuple) else (declared,)
    return shapes


def setup_namespace(exercise):
    """What setup_code defines, as it defines it (float32, no cast)."""
    namespace = dict(MODULES)
    exec(compile(exercise.setup_code, f"<{exercise.name} setup>", "exec"), namespace)
    return namespace


def assigned_names(code):
    """The names code assigns or augments (dC in `dC = ...`, `dC[ix] += ...` and `dC += ...`)."""
    targets = [t for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Assign | ast.AugAssign)
               for t in ([node.target] if isinstance(node, ast.AugAssign) else node.targets)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def rules_broken(wrong, right, hint):
    """The rules a slip's value breaks: it has another shape, which its hint names, or it is more than SLIP_APART from
    the right value (and always more than the grader's RTOL, or no grader could tell it)."""
    if wrong.shape != right.shape:
        assert str(tuple(right.shape)) in hint, (tuple(wrong.shape), hint)
        return []
    apart = relative(wrong, right)
    assert apart > RTOL, hint
    return [] if apart > SLIP_APART else [f"only {apart:.1e} from the right value"]


def lookups(exercise):
    """The forward's table lookups by a batch of indices, [(table, index)]: emb = C[Xb] is ('C', 'Xb')."""
    found = (re.fullmatch(r"(\w+)\[(\w+)\]", step.source) for step in exercise.steps().values())
    return [match.groups() for match in found if match]


@pytest.mark.parametrize("name", EXERCISES)
def test_the_solution_matches_autograd_in_float64(name):
    """The worked solution, and its step-by-step part alone: before a one-step formula writes a gradient again."""
    exercise = EXERCISES[name]
    for code in dict.fromkeys([exercise.solution_code, step_by_step(exercise)]):
        rows = check_solution(replace(exercise, solution_code=code))
        assert [r[0] for r in rows] == ["d" + g for g in exercise.gradients]
        assert all(relative <= SOLUTION_RTOL for _, _, relative in rows), rows


@pytest.mark.parametrize("name", EXERCISES)
def test_the_solution_run_as_a_float32_file_is_within_the_graders_tolerance(name):
    """Setup, forward and solution top to bottom in one namespace, in float32 as a learner's file runs: every gradient
    is float32, within FLOAT32_RTOL of autograd in float32, and within the grader's RTOL of autograd in float64 (scaled
    as the grader scales: by the largest of the gradient and those of the steps that read its tensor)."""
    exercise = EXERCISES[name]
    namespace = dict(MODULES)
    source = exercise.setup_code + exercise.forward_code + exercise.solution_code
    exec(compile(source, f"<{name} as a script>", "exec"), namespace)
    tensors, constants = run_setup(exercise, torch.float32)
    expected32 = reference_gradients(exercise, tensors, constants)
    expected = reference_gradients(exercise, {k: v.double() if v.is_floating_point() else v
                                              for k, v in tensors.items()}, constants)
    reading = readers(exercise)
    for gradient in exercise.gradients:
        mine = namespace["d" + gradient]
        assert mine.dtype == torch.float32, gradient
        assert relative(mine, expected32[gradient]) < FLOAT32_RTOL, gradient
        scale = max(expected[n].abs().max().item() for n in [gradient, *reading.get(gradient, [])] if n in expected)
        assert (mine.double() - expected[gradient]).abs().max().item() <= RTOL * scale, gradient


@pytest.mark.parametrize("name", EXERCISES)
def test_the_forward_is_finite_with_the_shapes_its_comments_say(name):
    exercise = EXERCISES[name]
    _, constants, values, _ = solved(exercise)
    shapes = declared_shapes(exercise, constants)
    assert list(shapes) == list(exercise.steps())
    for step, shape in shapes.items():
        assert tuple(values[step].shape) == shape, (step, tuple(values[step].shape), shape)
        assert torch.isfinite(values[step]).all(), step
    assert values["loss"].ndim == 0
    tensors32, _ = run_setup(exercise, torch.float32)
    assert torch.isfinite(forward(exercise, tensors32, constants)["loss"])


@pytest.mark.parametrize("name", EXERCISES)
def test_the_setup_is_seeded_and_its_parameters_float32_and_not_trivial(name):
    exercise = EXERCISES[name]
    first, second = setup_namespace(exercise), setup_namespace(exercise)
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert set(exercise.parameters) <= set(tensors)
    for tensor in tensors:
        assert torch.equal(first[tensor], second[tensor]), tensor
    for constant in exercise.constants:
        assert isinstance(first[constant], int | float) and first[constant] == second[constant], constant
    for parameter in exercise.parameters:
        p = first[parameter]
        assert p.dtype == torch.float32, parameter
        # no entry 0 or 1 (a zero bias or a unit gain hides a wrong backward), and a spread: not a constant tensor
        assert (p != 0).all() and (p != 1).all() and p.numel() > 1 and p.std() > 0.01, parameter


@pytest.mark.parametrize("name", EXERCISES)
def test_each_gradient_comes_after_every_step_that_reads_its_tensor(name):
    """gradients lists every parameter and every intermediate but the loss, once, in an order a backward can follow."""
    exercise = EXERCISES[name]
    position = {gradient: i for i, gradient in enumerate(exercise.gradients)}
    assert len(position) == len(exercise.gradients)
    assert set(position) == (set(exercise.steps()) - {"loss"}) | set(exercise.parameters)
    for tensor, reading in readers(exercise).items():
        for reader in reading:
            if tensor in position and reader in position:
                assert position[reader] < position[tensor], f"d{tensor} comes before d{reader}, which it needs"


@pytest.mark.parametrize("name", EXERCISES)
def test_the_solution_writes_in_that_order_and_adds_only_where_a_tensor_fans_out(name):
    """Step by step, the last write of each gradient follows exercise.gradients; `+=` adds a second path to a tensor
    read by more than one step; every in-place change (`dlogits /= n`, `dlogprobs[...] = ...`) is to a gradient
    written before."""
    exercise = EXERCISES[name]
    fan_out = {tensor for tensor, reading in readers(exercise).items() if len(reading) > 1}
    last_write, assigned = {}, set()
    for i, node in enumerate(ast.parse(step_by_step(exercise)).body):
        (target,) = [node.target] if isinstance(node, ast.AugAssign) else node.targets
        in_place = isinstance(node, ast.AugAssign) or not isinstance(target, ast.Name)
        while not isinstance(target, ast.Name):
            target = target.value
        if in_place:
            assert target.id in assigned, ast.unparse(node)
        assigned.add(target.id)
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            assert target.id[1:] in fan_out, ast.unparse(node)
        last_write[target.id] = i
    written = sorted((n for n in last_write if n.startswith("d") and n[1:] in exercise.gradients), key=last_write.get)
    assert written == ["d" + gradient for gradient in exercise.gradients]


@pytest.mark.parametrize("name", EXERCISES)
def test_every_pitfall_runs_and_is_wrong_and_apart_from_its_gradients_other_slips(name):
    """Each slip assigns its gradient and runs on the solved values; it is wrong (rules_broken) and more than
    SLIP_APART from every other slip of its gradient, so the hint shown is the one that explains it."""
    exercise = EXERCISES[name]
    assert len(exercise.pitfalls) >= PITFALLS_AT_LEAST.get(name, 4)
    _, constants, values, solution = solved(exercise)
    right = {gradient: solution["d" + gradient] for gradient in exercise.gradients}
    slipped = {}
    for pitfall in exercise.pitfalls:
        assert pitfall.gradient in exercise.gradients and pitfall.hint and "\n" not in pitfall.hint, pitfall
        target = "d" + pitfall.gradient
        assert target in assigned_names(pitfall.slip), pitfall.slip
        scope = {k: v.clone() for k, v in (values | {"d" + g: value for g, value in right.items()}).items()}
        wrong = run_code(pitfall.slip, scope, constants, f"<{name} slip>")[target]
        broken = rules_broken(wrong, right[pitfall.gradient], pitfall.hint)
        broken += [f"within {SLIP_APART} of the slip {other!r}" for other, value in slipped.get(target, [])
                   if value.shape == wrong.shape and not relative(wrong, value) > SLIP_APART]
        assert bool(broken) == ((name, pitfall.slip) in REVIEWED_SLIPS), (pitfall.slip, broken)
        slipped.setdefault(target, []).append((pitfall.slip, wrong))


@pytest.mark.parametrize("name", EXERCISES)
def test_every_forward_slip_is_wrong_and_reads_only_its_steps_inputs(name):
    exercise = EXERCISES[name]
    _, constants, values, _ = solved(exercise)
    steps = exercise.steps()
    for slip in exercise.forward_slips:
        assert slip.name in steps and slip.hint and "\n" not in slip.hint, slip
        (step,) = parse_forward(f"{slip.name} = {slip.slip}", exercise.constants).values()
        broken = rules_broken(step(values, constants), values[slip.name], slip.hint)
        others = set(step.inputs) - set(steps[slip.name].inputs)
        broken += [f"reads {sorted(others)}, which its step does not"] if others else []
        assert bool(broken) == ((name, slip.slip) in REVIEWED_SLIPS), (slip.slip, broken)


@pytest.mark.parametrize("name", [name for name, exercise in EXERCISES.items() if lookups(exercise)])
def test_every_lookup_repeats_an_index(name):
    """A table looked up by a batch of indices (emb = C[Xb]) gets some row's gradient from several positions, so on
    these numbers `dC[Xb] += demb`, which keeps one of them, is wrong: a scatter-add (index_add_) is needed."""
    tensors, _ = run_setup(EXERCISES[name])
    for table, index in lookups(EXERCISES[name]):
        assert torch.bincount(tensors[index].view(-1)).max() > 1, (table, index)


@pytest.mark.parametrize("name", EXERCISES)
def test_the_derivation_page_shows_exactly_the_exercises_code_where_it_shows_code(name):
    """The page's python blocks, if it has any, hold every line of the forward and of the solution and no other code
    (comments aside): the page derives exactly the code the learner gets."""
    exercise = EXERCISES[name]
    page = DOCS / exercise.page
    blocks = PYTHON_BLOCK.findall(page.read_text()) if page.is_file() else []
    shown = {line.strip() for block in blocks for line in block.splitlines()}
    code = {line.strip() for line in (exercise.forward_code + exercise.solution_code).splitlines()}
    code = {line for line in code if line and not line.startswith("#")}
    assert not shown or not code - shown, f"not on the page: {sorted(code - shown)}"
    extra = {line for line in shown - code if line and not line.startswith("#")}
    assert not extra, f"on the page only: {sorted(extra)}"


# ---- the exercise graded ----

def quiet_grade(path):
    return grade_script(path, io.StringIO())


def script(exercise, solution_code):
    """A learner's file of exercise with solution_code as its backward (no grading call: graded from outside)."""
    return solution_source(replace(exercise, solution_code=solution_code)).rsplit("\nresult = grade(", 1)[0] + "\n"


def first_line(exercise, solution_code):
    """The line of script(exercise, solution_code) that solution_code's first line is on."""
    text = script(exercise, solution_code)
    return text[: text.index(solution_code)].count("\n") + 1



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
        for cell in notebook.cells:     # each notebook numbers its own cells: their ids repeat across notebooks
            cell.id = f"{name}-{cell.id}"
        cells += [nbformat.v4.new_code_cell("%reset -f", id=f"{name}-reset")] + notebook.cells
    assert len({cell.id for cell in cells}) == len(cells)
    combined = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(combined, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = [o for cell in combined.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for exercise in EXERCISES.values():
        assert f"gradients: {len(exercise.gradients)} missing -- nothing written yet" in printed


def every(field, label):
    """Test parameters (exercise name, index) for each entry of every exercise's field ('pitfalls', ...), with ids
    '<exercise>-<label of the entry>-<index>'."""
    return [pytest.param(name, i, id=f"{name}-{label(entry)}-{i}")
            for name, e in EXERCISES.items() for i, entry in enumerate(getattr(e, field))]


@pytest.mark.parametrize(("name", "index"), every("pitfalls", lambda pitfall: "d" + pitfall.gradient))
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


@pytest.mark.parametrize(("name", "index"), every("forward_slips", lambda slip: slip.name))
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
